//! The Memory backend: the default. Nothing is persisted, so the port map
//! starts empty at every start and lives only in the daemon.

use vspc_backend_api::Backend;

/// Keeps nothing; every hook is the trait's no-op default.
#[derive(Debug, Default)]
pub struct MemoryBackend;

impl Backend for MemoryBackend {
    fn name(&self) -> &str {
        "Memory"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn description(&self) -> &str {
        "keeps the port map in memory only (the default); takes no options"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vspc_backend_api::VmRecord;

    #[test]
    fn through_the_trait() {
        let mut b: Box<dyn Backend> = Box::new(MemoryBackend);
        assert_eq!(b.name(), "Memory");
        assert!(b.configure(&[]).is_ok());
        let err = b.configure(&[("x".into(), None)]).unwrap_err();
        assert!(err.to_string().contains("--x"));
        assert!(!b.persists());
        assert!(b.load_map().unwrap().is_empty());
        let rec = VmRecord {
            uuid: "u".into(),
            name: "n".into(),
            port: Some(1),
        };
        assert_eq!(b.list_rows(vec![rec.clone()]), vec![rec.clone()]);
        assert!(b.seed_data(&rec).is_empty());
        assert!(!b.wants_console_data());
    }
}
