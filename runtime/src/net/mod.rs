//! The host side of `mvm run --net`: the VM's tap, its addresses, NAT, and clean-up
//! (docs/net.md).
//!
//! - [`allow`]: `--allow`/`--dns` parsing, host names pinned to addresses at admission,
//!   and the admission policy's egress cap.
//! - [`pool`]: one /30 per VM from a configurable pool (`MVM_NET_POOL`).
//! - [`tap`]: persistent taps, created, addressed, brought up and deleted with ioctls.
//! - [`nft`]: the per-tap nftables table (NAT and a forward filter) as text, applied
//!   with `nft -f -`.
//! - [`leftovers`]: what a killed run left (taps and tables of dead owners).
//! - [`session`]: one VM's network, set up under a host-wide lock and torn down on drop.
//! - [`run`]: the steps the run path, admission and the kvm backend call.
//!
//! Setting up needs CAP_NET_ADMIN ([`NetError::NoCapability`], exit status 117); NAT
//! needs `nft`. The guest reads the `mvm.net=` word (`mvm_agent::net_config`); the
//! tap's address is set through `mvm_agent::netif`, the ioctls the guest uses too.

pub mod allow;
pub mod leftovers;
pub mod nft;
pub mod pool;
pub mod run;
pub mod session;
pub mod tap;

use std::net::Ipv4Addr;

use mvm_loader::plan::{EgressRule, NetInterface};
use serde::{Deserialize, Serialize};

pub use session::NetSession;

/// What a run asks of the network, after admission pinned its names: carried in the
/// run spec (also into the emulated tier's test host, where the tap is made).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRequest {
    /// Allowed destinations, addresses and networks only.
    pub allow: Vec<EgressRule>,
    /// DNS resolvers the guest may use.
    pub resolvers: Vec<Ipv4Addr>,
    /// The guest interface chosen beforehand (the emulated tier chooses it on the outer
    /// host, where the plan is made); `None`: the first free /30 of the pool.
    #[serde(default)]
    pub interface: Option<NetInterface>,
    /// The tap, when the caller set the host network up already (the kvm tier does it
    /// before admission and holds it for the run).
    #[serde(default)]
    pub tap: Option<String>,
    /// TCP destinations (the hosts secrets are bound to, pinned) whose connections the
    /// host turns towards the run's egress proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intercept: Vec<std::net::SocketAddrV4>,
}

/// Why the host network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No CAP_NET_ADMIN.
    #[error("CAP_NET_ADMIN is needed to create and address a tap (run as root, or give mvm the capability: setcap cap_net_admin+ep); see docs/net.md")]
    NoCapability,
    /// No tun driver.
    #[error("{} is needed (the tun module: modprobe tun)", tap::TUN_DEVICE)]
    NoTun,
    /// This process has made its last tap name.
    #[error(
        "this process has created {} taps; no more names",
        leftovers::MAX_TAPS_PER_PROCESS
    )]
    TooManyTaps,
    /// `MVM_NET_POOL` does not parse.
    #[error("{0}")]
    Pool(pool::PoolParseError),
    /// Every /30 of the pool overlaps an address on the host.
    #[error("address pool {0} has no free /30 (set MVM_NET_POOL to another network)")]
    PoolExhausted(String),
    /// A fixed interface that does not fit a tap.
    #[error("guest interface: {0}")]
    Interface(String),
    /// A tap ioctl failed.
    #[error("tap {tap}: {source}")]
    Tap {
        /// The tap.
        tap: String,
        /// Why.
        source: std::io::Error,
    },
    /// nftables failed.
    #[error("nftables: {0}")]
    Nft(nft::NftError),
    /// Any other host I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

impl NetError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
        let what = what.into();
        move |source| NetError::Io { what, source }
    }

    /// Whether the failure is a missing privilege (the caller's fix, not mvm's):
    /// no CAP_NET_ADMIN, or the kernel said EPERM/EACCES.
    #[must_use]
    pub fn is_permission(&self) -> bool {
        match self {
            Self::NoCapability => true,
            Self::Tap { source, .. } | Self::Io { source, .. } => {
                source.kind() == std::io::ErrorKind::PermissionDenied
            }
            _ => false,
        }
    }
}
