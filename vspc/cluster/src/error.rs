//! The registry's errors: each message names the problem and what fixes it,
//! so the daemon can log it as it is.

use std::time::Duration;

/// What went wrong talking to the control plane.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("bad --cluster URL {url:?}: {detail}; expected redis://[:PASSWORD@]HOST:PORT[/DB] or rediss://...")]
    BadUrl { url: String, detail: String },

    #[error("bad {what} {value:?}: {why}")]
    BadName {
        what: &'static str,
        value: String,
        why: &'static str,
    },

    #[error("cannot reach Redis at {url}: {detail}; check that redis-server runs there and that --cluster names its host and port")]
    Unreachable { url: String, detail: String },

    #[error("Redis at {url} refused our credentials ({detail}); put the right password in the --cluster URL (redis://:PASSWORD@HOST:PORT, or redis://USER:PASSWORD@HOST:PORT for an ACL user)")]
    Auth { url: String, detail: String },

    #[error("Redis at {url} has no such database ({detail}); use a database number below the server's `databases` setting in the --cluster URL")]
    WrongDb { url: String, detail: String },

    #[error("node name {node:?} is held by a live node of cluster {cluster:?} (instance {instance}, advertising {advertise}, key expires in {expires_in:?}); give this node another --node-name, or stop the other one first")]
    NameTaken {
        cluster: String,
        node: String,
        instance: String,
        advertise: String,
        expires_in: Duration,
    },

    #[error("cluster {cluster:?} gives console ports from {theirs} but this node has --port-range-start {ours}; give every node of a cluster the same --port-range-start")]
    RangeMismatch {
        cluster: String,
        theirs: u16,
        ours: u16,
    },

    #[error("Redis is unavailable ({detail}); this node goes on with what it holds and re-asserts it when Redis is back")]
    Unavailable { detail: String },

    #[error("no free console port from {start} up in cluster {cluster:?}; let idle VMs expire (--vm-expire-time) or lower --port-range-start")]
    NoPort { cluster: String, start: u16 },

    #[error("a vMotion ticket for this sequence is pending for another VM ({uuid}); answer NOTNOW and let ESXi try again")]
    TicketClash { uuid: String },

    #[error("Redis answered something this vspc does not understand ({detail}); do all nodes of the cluster run the same vspc version?")]
    Protocol { detail: String },
}

impl Error {
    /// True when the error means "Redis is not there right now": the daemon
    /// goes on locally.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}
