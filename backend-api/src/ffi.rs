//! The stable-ABI boundary between the daemon and every backend.
//!
//! The daemon holds each backend as a [`BackendBox`]: an `abi_stable` trait
//! object whose methods take and return only FFI-safe types. A plugin's
//! shared library exports a versioned root module ([`BackendMod`]) whose
//! `new` makes one; built-in backends are boxed the same way with
//! [`BackendBox::new`]-style [`boxed`]. Either way the object is a
//! [`Guarded`] wrapper around the author's [`Backend`]: every call runs
//! inside `catch_unwind` *in the backend's own code*, because a panic must
//! never unwind across the FFI boundary (that aborts the process).
//!
//! The root module carries this crate's version; the daemon refuses a plugin
//! built against an incompatible `vspc-backend-api` before calling into it.

// `#[sabi_trait]` expands to impls inside a generated const, which rustc's
// non_local_definitions lint flags; the expansion is abi_stable's, not ours.
#![allow(non_local_definitions)]

use crate::{log, Backend, OptionSpec, SessionEvent, VmRecord};
use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_trait::TD_Opaque,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2},
    StableAbi,
};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// [`VmRecord`] in FFI-safe form.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Default)]
pub struct FfiRecord {
    pub uuid: RString,
    pub name: RString,
    pub port: ROption<u16>,
}

impl From<&VmRecord> for FfiRecord {
    fn from(r: &VmRecord) -> FfiRecord {
        FfiRecord {
            uuid: r.uuid.as_str().into(),
            name: r.name.as_str().into(),
            port: r.port.into(),
        }
    }
}

impl From<&FfiRecord> for VmRecord {
    fn from(r: &FfiRecord) -> VmRecord {
        VmRecord {
            uuid: r.uuid.to_string(),
            name: r.name.to_string(),
            port: r.port.into_option(),
        }
    }
}

/// [`SessionEvent`] in FFI-safe form.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Default)]
pub struct FfiSessionEvent {
    pub id: u64,
    pub kind: RString,
    pub peer: RString,
    pub user: RString,
    pub vm: FfiRecord,
    pub access: RString,
    pub duration_ms: u64,
    pub bytes_to_vm: u64,
    pub bytes_from_vm: u64,
}

impl From<&SessionEvent> for FfiSessionEvent {
    fn from(e: &SessionEvent) -> FfiSessionEvent {
        FfiSessionEvent {
            id: e.id,
            kind: e.kind.as_str().into(),
            peer: e.peer.as_str().into(),
            user: e.user.as_str().into(),
            vm: FfiRecord::from(&e.vm),
            access: e.access.as_str().into(),
            duration_ms: e.duration_ms,
            bytes_to_vm: e.bytes_to_vm,
            bytes_from_vm: e.bytes_from_vm,
        }
    }
}

impl From<&FfiSessionEvent> for SessionEvent {
    fn from(e: &FfiSessionEvent) -> SessionEvent {
        SessionEvent {
            id: e.id,
            kind: e.kind.to_string(),
            peer: e.peer.to_string(),
            user: e.user.to_string(),
            vm: VmRecord::from(&e.vm),
            access: e.access.to_string(),
            duration_ms: e.duration_ms,
            bytes_to_vm: e.bytes_to_vm,
            bytes_from_vm: e.bytes_from_vm,
        }
    }
}

/// [`OptionSpec`] in FFI-safe form.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct FfiOption {
    pub long: RString,
    /// A `char` as u32, if the option has a short form.
    pub short: ROption<u32>,
    pub value: ROption<RString>,
    pub default: ROption<RString>,
    pub help: RString,
}

impl From<&OptionSpec> for FfiOption {
    fn from(o: &OptionSpec) -> FfiOption {
        FfiOption {
            long: o.long.as_str().into(),
            short: o.short.map(u32::from).into(),
            value: o.value.as_deref().map(RString::from).into(),
            default: o.default.as_deref().map(RString::from).into(),
            help: o.help.as_str().into(),
        }
    }
}

impl From<&FfiOption> for OptionSpec {
    fn from(o: &FfiOption) -> OptionSpec {
        OptionSpec {
            long: o.long.to_string(),
            short: o.short.into_option().and_then(char::from_u32),
            value: o.value.as_ref().map(|s| s.to_string()).into_option(),
            default: o.default.as_ref().map(|s| s.to_string()).into_option(),
            help: o.help.to_string(),
        }
    }
}

/// The daemon's log callback: level (see [`log::Level`]) and message.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct Logger {
    pub log: extern "C" fn(u8, RStr<'_>),
}

/// The backend as the daemon sees it across the ABI boundary.
#[sabi_trait]
pub trait BackendObj: Send {
    fn name(&self) -> RString;
    fn version(&self) -> RString;
    fn description(&self) -> RString;
    fn options(&self) -> RVec<FfiOption>;
    fn configure(
        &mut self,
        options: RVec<Tuple2<RString, ROption<RString>>>,
    ) -> RResult<(), RString>;
    fn persists(&self) -> bool;
    fn load_map(&mut self) -> RResult<RVec<FfiRecord>, RString>;
    fn wants_console_data(&self) -> bool;
    fn vm_connected(&mut self, vm: &FfiRecord);
    fn vm_renamed(&mut self, vm: &FfiRecord, old_name: RStr<'_>);
    fn vm_disconnected(&mut self, vm: &FfiRecord);
    fn vm_expired(&mut self, vm: &FfiRecord);
    fn console_data(&mut self, vm: &FfiRecord, data: RSlice<'_, u8>);
    fn console_attached(&mut self, vm: &FfiRecord);
    fn console_detached(&mut self, vm: &FfiRecord);
    fn seed_data(&mut self, vm: &FfiRecord) -> RVec<u8>;
    fn list_rows(&mut self, rows: RVec<FfiRecord>) -> RVec<FfiRecord>;
    fn reopen(&mut self);
    fn idle(&mut self);
    #[sabi(last_prefix_field)]
    fn shutdown(&mut self);
    // Methods below were added after the first release: a plugin built
    // before them lacks them, and the default body answers instead.
    /// See [`Backend::needs_every_byte`].
    fn needs_every_byte(&self) -> bool {
        false
    }
    /// See [`Backend::console_log`]; `max` in bytes.
    fn console_log(&mut self, _vm: &FfiRecord, _max: u64) -> ROption<RVec<u8>> {
        ROption::RNone
    }
    /// See [`Backend::session_started`].
    fn session_started(&mut self, _ev: &FfiSessionEvent) {}
    /// See [`Backend::session_ended`].
    fn session_ended(&mut self, _ev: &FfiSessionEvent) {}
}

/// An owned backend behind the stable ABI.
pub type BackendBox = BackendObj_TO<'static, RBox<()>>;

/// Box a backend for the daemon, behind the panic guard.
pub fn boxed<B: Backend + 'static>(backend: B) -> BackendBox {
    BackendObj_TO::from_value(Guarded::new(backend), TD_Opaque)
}

/// Make a backend with `make` and box it; a panic becomes an error.
pub fn construct<B, F>(make: F) -> RResult<BackendBox, RString>
where
    B: Backend + 'static,
    F: FnOnce() -> B,
{
    match catch_unwind(AssertUnwindSafe(make)) {
        Ok(b) => RResult::ROk(boxed(b)),
        Err(p) => {
            RResult::RErr(format!("backend panicked while starting: {}", panic_text(&*p)).into())
        }
    }
}

/// The plugin's root module: what `export_backend!` exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = BackendModRef)))]
#[sabi(missing_field(panic))]
pub struct BackendMod {
    /// Make the backend; `Logger` carries its log lines to the daemon.
    #[sabi(last_prefix_field)]
    pub new: extern "C" fn(Logger) -> RResult<BackendBox, RString>,
}

impl RootModule for BackendModRef {
    declare_root_module_statics! {BackendModRef}
    const BASE_NAME: &'static str = "vspc_backend";
    const NAME: &'static str = "vspc_backend";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// This crate's version, which plugins must be compatible with.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Wraps a [`Backend`] so that every call is guarded against panics; the
/// object the daemon holds.
pub struct Guarded<B> {
    inner: B,
    /// Cached so a broken backend can still be named in messages.
    name: String,
    /// Records already converted for console data, by uuid.
    records: std::collections::HashMap<String, VmRecord>,
}

/// Most records [`Guarded`] keeps converted; past this it starts over.
const RECORD_CACHE: usize = 65_536;

impl<B: Backend> Guarded<B> {
    pub fn new(inner: B) -> Guarded<B> {
        let name = catch_unwind(AssertUnwindSafe(|| inner.name().to_string()))
            .unwrap_or_else(|_| "(unnamed)".to_string());
        Guarded {
            inner,
            name,
            records: std::collections::HashMap::new(),
        }
    }

    /// Run `f` on the backend; on a panic, log it and return `fallback()`.
    fn guard<R>(
        &mut self,
        hook: &str,
        fallback: impl FnOnce() -> R,
        f: impl FnOnce(&mut B) -> R,
    ) -> R {
        let inner = &mut self.inner;
        match catch_unwind(AssertUnwindSafe(|| f(inner))) {
            Ok(r) => r,
            Err(p) => {
                log::error(&format!(
                    "backend {} panicked in {hook}: {}; it keeps running",
                    self.name,
                    panic_text(&*p)
                ));
                fallback()
            }
        }
    }

    fn guard_ref<R>(&self, hook: &str, fallback: impl FnOnce() -> R, f: impl FnOnce(&B) -> R) -> R {
        match catch_unwind(AssertUnwindSafe(|| f(&self.inner))) {
            Ok(r) => r,
            Err(p) => {
                log::error(&format!(
                    "backend {} panicked in {hook}: {}",
                    self.name,
                    panic_text(&*p)
                ));
                fallback()
            }
        }
    }
}

impl<B: Backend> BackendObj for Guarded<B> {
    fn name(&self) -> RString {
        self.name.as_str().into()
    }

    fn version(&self) -> RString {
        self.guard_ref("version", || "?".into(), |b| b.version().into())
    }

    fn description(&self) -> RString {
        self.guard_ref("description", RString::new, |b| b.description().into())
    }

    fn options(&self) -> RVec<FfiOption> {
        self.guard_ref("options", RVec::new, |b| {
            b.options().iter().map(FfiOption::from).collect()
        })
    }

    fn configure(
        &mut self,
        options: RVec<Tuple2<RString, ROption<RString>>>,
    ) -> RResult<(), RString> {
        let opts: Vec<(String, Option<String>)> = options
            .into_iter()
            .map(|Tuple2(k, v)| (k.into_string(), v.map(RString::into_string).into_option()))
            .collect();
        let name = self.name.clone();
        self.guard(
            "configure",
            || RResult::RErr(format!("backend {name} panicked while reading its options").into()),
            |b| match b.configure(&opts) {
                Ok(()) => RResult::ROk(()),
                Err(e) => RResult::RErr(e.0.into()),
            },
        )
    }

    fn persists(&self) -> bool {
        self.guard_ref("persists", || false, |b| b.persists())
    }

    fn load_map(&mut self) -> RResult<RVec<FfiRecord>, RString> {
        let name = self.name.clone();
        self.guard(
            "load_map",
            || RResult::RErr(format!("backend {name} panicked while loading its map").into()),
            |b| match b.load_map() {
                Ok(v) => RResult::ROk(v.iter().map(FfiRecord::from).collect()),
                Err(e) => RResult::RErr(e.0.into()),
            },
        )
    }

    fn wants_console_data(&self) -> bool {
        self.guard_ref("wants_console_data", || false, |b| b.wants_console_data())
    }

    fn vm_connected(&mut self, vm: &FfiRecord) {
        let rec = VmRecord::from(vm);
        self.guard("vm_connected", || (), |b| b.vm_connected(&rec))
    }

    fn vm_renamed(&mut self, vm: &FfiRecord, old_name: RStr<'_>) {
        let rec = VmRecord::from(vm);
        self.guard(
            "vm_renamed",
            || (),
            |b| b.vm_renamed(&rec, old_name.as_str()),
        )
    }

    fn vm_disconnected(&mut self, vm: &FfiRecord) {
        let rec = VmRecord::from(vm);
        self.guard("vm_disconnected", || (), |b| b.vm_disconnected(&rec))
    }

    fn vm_expired(&mut self, vm: &FfiRecord) {
        let rec = VmRecord::from(vm);
        self.guard("vm_expired", || (), |b| b.vm_expired(&rec))
    }

    fn console_data(&mut self, vm: &FfiRecord, data: RSlice<'_, u8>) {
        // Console data is the hot path: reuse the record converted last
        // time for this VM, so an event costs no string copies.
        let fresh = match self.records.get(vm.uuid.as_str()) {
            Some(r) => r.name != vm.name.as_str() || r.port != vm.port.into_option(),
            None => true,
        };
        if fresh {
            if self.records.len() >= RECORD_CACHE {
                self.records.clear();
            }
            self.records.insert(vm.uuid.to_string(), VmRecord::from(vm));
        }
        let Some(rec) = self.records.get(vm.uuid.as_str()) else {
            return;
        };
        let inner = &mut self.inner;
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| {
            inner.console_data(rec, data.as_slice())
        })) {
            log::error(&format!(
                "backend {} panicked in console_data: {}; it keeps running",
                self.name,
                panic_text(&*p)
            ));
        }
    }

    fn console_attached(&mut self, vm: &FfiRecord) {
        let rec = VmRecord::from(vm);
        self.guard("console_attached", || (), |b| b.console_attached(&rec))
    }

    fn console_detached(&mut self, vm: &FfiRecord) {
        let rec = VmRecord::from(vm);
        self.guard("console_detached", || (), |b| b.console_detached(&rec))
    }

    fn seed_data(&mut self, vm: &FfiRecord) -> RVec<u8> {
        let rec = VmRecord::from(vm);
        self.guard("seed_data", RVec::new, |b| b.seed_data(&rec).into())
    }

    fn list_rows(&mut self, rows: RVec<FfiRecord>) -> RVec<FfiRecord> {
        let plain: Vec<VmRecord> = rows.iter().map(VmRecord::from).collect();
        self.guard(
            "list_rows",
            move || rows,
            |b| b.list_rows(plain).iter().map(FfiRecord::from).collect(),
        )
    }

    fn reopen(&mut self) {
        self.guard("reopen", || (), |b| b.reopen())
    }

    fn idle(&mut self) {
        self.guard("idle", || (), |b| b.idle())
    }

    fn shutdown(&mut self) {
        self.guard("shutdown", || (), |b| b.shutdown())
    }

    fn needs_every_byte(&self) -> bool {
        self.guard_ref("needs_every_byte", || false, |b| b.needs_every_byte())
    }

    fn console_log(&mut self, vm: &FfiRecord, max: u64) -> ROption<RVec<u8>> {
        let rec = VmRecord::from(vm);
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        self.guard(
            "console_log",
            || ROption::RNone,
            |b| b.console_log(&rec, max).map(RVec::from).into(),
        )
    }

    fn session_started(&mut self, ev: &FfiSessionEvent) {
        let ev = SessionEvent::from(ev);
        self.guard("session_started", || (), |b| b.session_started(&ev))
    }

    fn session_ended(&mut self, ev: &FfiSessionEvent) {
        let ev = SessionEvent::from(ev);
        self.guard("session_ended", || (), |b| b.session_ended(&ev))
    }
}

/// Export a backend from a plugin crate (`crate-type = ["cdylib"]`):
/// `vspc_backend_api::export_backend!(MyBackend::default());`
/// The expression runs once per load, inside a panic guard. The plugin
/// crate must depend on `abi_stable = "0.11"` itself: the export attribute
/// this expands to names that crate directly.
#[macro_export]
macro_rules! export_backend {
    ($make:expr) => {
        #[$crate::abi_stable::export_root_module]
        fn vspc_backend_root_module() -> $crate::ffi::BackendModRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            $crate::ffi::BackendMod {
                new: vspc_backend_new,
            }
            .leak_into_prefix()
        }

        extern "C" fn vspc_backend_new(
            logger: $crate::ffi::Logger,
        ) -> $crate::abi_stable::std_types::RResult<
            $crate::ffi::BackendBox,
            $crate::abi_stable::std_types::RString,
        > {
            $crate::log::install(logger);
            $crate::ffi::construct(|| $make)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackendError;

    #[derive(Default)]
    struct Panicky {
        seen: Vec<String>,
    }

    impl Backend for Panicky {
        fn name(&self) -> &str {
            "Panicky"
        }
        fn options(&self) -> Vec<OptionSpec> {
            vec![OptionSpec::value("dir", Some('d'), "DIR", "a dir").with_default("/x")]
        }
        fn configure(&mut self, o: &crate::Options) -> Result<(), BackendError> {
            match o.first() {
                Some((k, Some(v))) if k == "dir" && v == "bad" => Err(BackendError::new("bad dir")),
                _ => Ok(()),
            }
        }
        fn vm_connected(&mut self, vm: &VmRecord) {
            self.seen.push(vm.name.clone());
            if vm.name == "boom" {
                panic!("boom in vm_connected");
            }
        }
        fn seed_data(&mut self, _vm: &VmRecord) -> Vec<u8> {
            self.seen.concat().into_bytes()
        }
    }

    fn rec(name: &str) -> FfiRecord {
        FfiRecord {
            uuid: "u".into(),
            name: name.into(),
            port: ROption::RSome(5),
        }
    }

    #[test]
    fn calls_cross_the_boundary_and_panics_do_not() {
        let mut b = boxed(Panicky::default());
        assert_eq!(b.name().as_str(), "Panicky");
        let opts = b.options();
        assert_eq!(OptionSpec::from(&opts[0]).short, Some('d'));
        assert_eq!(OptionSpec::from(&opts[0]).default.as_deref(), Some("/x"));
        let bad = RVec::from(vec![Tuple2(
            RString::from("dir"),
            ROption::RSome(RString::from("bad")),
        )]);
        assert_eq!(
            b.configure(bad).into_result().unwrap_err().as_str(),
            "bad dir"
        );
        b.vm_connected(&rec("a"));
        b.vm_connected(&rec("boom"));
        b.vm_connected(&rec("c"));
        assert_eq!(b.seed_data(&rec("a")).as_slice(), b"aboomc");
        // A backend without transcripts answers console_log with nothing.
        assert!(b.console_log(&rec("a"), 10).is_none());
    }

    #[test]
    fn construct_reports_a_panicking_constructor() {
        let r = construct::<Panicky, _>(|| panic!("no"));
        let err = r.into_result().err().unwrap_or_default();
        assert!(
            err.as_str().contains("panicked while starting: no"),
            "{err}"
        );
    }

    #[test]
    fn records_convert_both_ways() {
        let r = VmRecord {
            uuid: "x".into(),
            name: "n\u{e9}".into(),
            port: None,
        };
        assert_eq!(VmRecord::from(&FfiRecord::from(&r)), r);
        let e = SessionEvent {
            id: 7,
            kind: "web".into(),
            peer: "127.0.0.1:5".into(),
            user: "token#1".into(),
            vm: r,
            access: "read-only".into(),
            duration_ms: 3,
            bytes_to_vm: 4,
            bytes_from_vm: 5,
        };
        assert_eq!(SessionEvent::from(&FfiSessionEvent::from(&e)), e);
    }
}
