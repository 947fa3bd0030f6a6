//! Size caps, so one client cannot fill the registry's memory or its watch
//! slots: the flags, and the caps the stores enforce.

use clap::Args;

use crate::store::table::Caps;

#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Most services with at least one instance; registering an instance of a
    /// new service past it gets `429 limit_exceeded` (existing ones still renew).
    #[arg(long, env = "TRELLIS_MAX_SERVICES", default_value_t = 10_000)]
    pub max_services: usize,
    /// Most instances of one service; registering a new instance past it gets
    /// `429 limit_exceeded` (existing ones still re-register and renew).
    #[arg(long, env = "TRELLIS_MAX_INSTANCES_PER_SERVICE", default_value_t = 10_000)]
    pub max_instances_per_service: usize,
    /// Most blocking queries one client address holds at once (besides
    /// `--max-watches` for all); past it that client's queries answer at once.
    #[arg(long, env = "TRELLIS_MAX_WATCHES_PER_CLIENT", default_value_t = 512)]
    pub max_watches_per_client: usize,
}

impl Limits {
    /// The caps the stores' tables enforce.
    pub fn caps(&self) -> Caps {
        Caps { max_services: self.max_services, max_instances_per_service: self.max_instances_per_service }
    }
}
