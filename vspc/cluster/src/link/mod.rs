//! The node-to-node link (to come).
