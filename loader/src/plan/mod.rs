//! The execution plan: what admission allows and the VMM must check before the
//! first guest instruction.
//!
//! A plan is JSON (schema in `docs/trust.md`), signed inside a DSSE envelope
//! ([`envelope`]). Every struct refuses unknown fields, a plan written for a
//! newer schema is refused with a message that says so, and [`Plan::from_json`]
//! validates ranges and names before anyone acts on a plan.

pub mod envelope;
pub mod net;
pub mod substitution;
pub mod time;

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::measure::Sha256Digest;
use crate::verity::VerityParams;
pub use net::NetInterface;
pub use substitution::{BoundHost, SubstitutedSecret, Substitution};
pub use time::UtcTime;

/// The schema version this code writes and the newest it reads.
pub const SCHEMA_VERSION: u32 = 1;
/// DSSE payloadType of a plan.
pub const PLAN_PAYLOAD_TYPE: &str = "application/vnd.mvm.plan+json";
/// The DSSE payload type of a VM snapshot's seal (the VMM's manifest, signed by the
/// host's admission key; docs/snapshots.md).
pub const SNAPSHOT_PAYLOAD_TYPE: &str = "application/vnd.mvm.snapshot+json";
/// Largest plan payload accepted, in bytes.
pub const MAX_PLAN_BYTES: usize = 64 * 1024;
/// vCPU count range.
pub const MIN_VCPUS: u8 = 1;
/// vCPU count range: the one limit, [`crate::limits::MAX_VCPUS`], as the plan's type.
pub const MAX_VCPUS: u8 = 32;
const _: () = assert!(MAX_VCPUS as u32 == crate::limits::MAX_VCPUS);
/// Guest memory range, MiB: a plan is for a real Linux guest, which needs this much.
pub const MIN_MEMORY_MIB: u32 = 32;
/// Guest memory range, MiB: the one limit, [`crate::limits::MAX_MEMORY_MIB`], as the
/// plan's type.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
const _: () = assert!(MAX_MEMORY_MIB as u64 == crate::limits::MAX_MEMORY_MIB);
/// Longest workload timeout a plan may carry.
pub const MAX_TIMEOUT_SECS: u32 = 7 * 24 * 3600;
/// Longest validity window (`not_after - not_before`). The replay store keeps a
/// nonce until its plan expires, so long windows cost host state.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Clock skew the VMM allows on each end of the window.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Nonce length range, in bytes (hex-encoded in the plan).
pub const MIN_NONCE_BYTES: usize = 16;
/// Nonce length range, in bytes.
pub const MAX_NONCE_BYTES: usize = 64;
/// Bounds on list lengths, so a plan's size bounds the work it causes.
pub const MAX_DISKS: usize = 8;
/// Most egress rules in one plan.
pub const MAX_EGRESS_RULES: usize = 256;
/// Most secrets one plan may name.
pub const MAX_SECRETS: usize = 64;

/// An execution plan (schema version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Always [`SCHEMA_VERSION`] when written by this code.
    pub schema_version: u32,
    /// Unique id, `[A-Za-z0-9._-]{1,64}`.
    pub plan_id: String,
    /// The plan may not boot before this instant (minus [`CLOCK_SKEW`]).
    pub not_before: UtcTime,
    /// Nor after this one (plus [`CLOCK_SKEW`]).
    pub not_after: UtcTime,
    /// Random, lowercase hex, 16..=64 bytes; used once per host.
    pub nonce: String,
    /// What the VMM measures before it boots.
    pub artifacts: Artifacts,
    /// vCPUs, memory, timeout.
    pub resources: Resources,
    /// The devices the VM gets.
    pub devices: Devices,
    /// In-guest policy the agent applies.
    pub guest: GuestPolicy,
    /// Names of the secrets that may be released into this VM.
    pub secrets: Vec<String>,
    /// Secrets the guest sees only as placeholders, put in place by the host's egress
    /// proxy in requests to the hosts they are bound to ([`substitution`]). Absent in
    /// plans without any (and in those written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substitution: Option<Substitution>,
    /// The weakest backend tier allowed to run this plan.
    pub required_tier: Tier,
}

/// The measured inputs of a boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifacts {
    /// Digest of the kernel image file (ELF vmlinux or bzImage).
    pub kernel: Sha256Digest,
    /// Digest of the initramfs, if the VM boots with one.
    pub initramfs: Option<Sha256Digest>,
    /// Digest of the exact kernel command line bytes.
    pub cmdline: Sha256Digest,
    /// Read-only disks, each pinned by its dm-verity tree.
    pub disks: Vec<PinnedDisk>,
}

/// A read-only disk whose every block is checked against a dm-verity tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedDisk {
    /// Name, `[a-z0-9_-]{1,32}`, unique among all disks of the plan.
    pub name: String,
    /// Root hash, salt and geometry of the tree.
    pub verity: VerityParams,
}

/// Resources the VM may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Number of vCPUs, [`MIN_VCPUS`]..=[`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest memory, [`MIN_MEMORY_MIB`]..=[`MAX_MEMORY_MIB`].
    pub memory_mib: u32,
    /// Wall-clock limit of the workload, 1..=[`MAX_TIMEOUT_SECS`].
    pub timeout_secs: u32,
}

/// The devices of the VM. Absent means "none".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Devices {
    /// The vsock device the runtime talks to the agent through.
    pub vsock: Option<VsockDevice>,
    /// Writable scratch disks (not measured: they start empty).
    pub scratch_disks: Vec<ScratchDisk>,
    /// The network device and its egress policy.
    pub net: Option<NetDevice>,
}

/// A virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockDevice {
    /// The guest's context id (3 or more: 0..=2 are reserved).
    pub guest_cid: u32,
    /// TCP forwards from the host's loopback into the guest, carried over this
    /// device by the guest agent: the only ports a sandbox's supervisor opens
    /// on the host, and the only guest ports it connects to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<PortForward>,
}

/// The most port forwards a plan names.
pub const MAX_FORWARDS: usize = 16;

/// `127.0.0.1:host` on the host forwarded to `127.0.0.1:guest` in the guest (TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// The host port (1..=65535, unique in the plan).
    pub host: u16,
    /// The guest port (1..=65535).
    pub guest: u16,
}

impl VsockDevice {
    /// The device at `guest_cid`, with no forwards.
    pub fn new(guest_cid: u32) -> Self {
        Self {
            guest_cid,
            forwards: Vec::new(),
        }
    }
}

/// An empty read-write disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScratchDisk {
    /// Name, `[a-z0-9_-]{1,32}`, unique among all disks of the plan.
    pub name: String,
    /// Size in MiB, 1..=1048576.
    pub size_mib: u32,
}

/// A virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDevice {
    /// The guest's MAC, address, gateway and resolvers ([`net`]). Absent in plans
    /// written before it existed: the VMM then takes the MAC from `--net`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<NetInterface>,
    /// What the guest may send to. Everything else is dropped in the device.
    pub egress: EgressPolicy,
}

/// Allowed egress destinations. An empty list allows nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// The allowed destinations.
    pub allow: Vec<EgressRule>,
}

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// Address, network or DNS name.
    pub host: EgressHost,
    /// Destination port, 1..=65535; the first of the range when `last_port` is set.
    pub port: u16,
    /// Last destination port of a range (inclusive, at least `port`); absent for one port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_port: Option<u16>,
    /// Transport protocol.
    pub protocol: Protocol,
}

/// Transport protocol of an egress rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// The host part of an egress rule, written as a string in JSON:
/// `192.0.2.7`, `2001:db8::1`, `10.0.0.0/8`, or `example.com`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EgressHost {
    /// One address.
    Ip(IpAddr),
    /// A network: address and prefix length (bits outside the prefix are zero).
    Cidr(IpAddr, u8),
    /// A DNS name, lowercase, as written.
    Name(String),
}

/// Why an egress host did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "egress host {0:?} is not an IP address, a CIDR network with zero host bits, or a DNS name"
)]
pub struct EgressHostParseError(pub String);

impl FromStr for EgressHost {
    type Err = EgressHostParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || EgressHostParseError(s.chars().take(80).collect());
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        if let Some((addr, prefix)) = s.split_once('/') {
            let ip: IpAddr = addr.parse().map_err(|_| err())?;
            if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(err());
            }
            let bits: u8 = prefix.parse().map_err(|_| err())?;
            let (max, value) = match ip {
                IpAddr::V4(v4) => (32, u128::from(u32::from(v4)) << 96),
                IpAddr::V6(v6) => (128, u128::from(v6)),
            };
            if bits > max {
                return Err(err());
            }
            // Host bits must be zero so one network has one spelling.
            let host_mask = u128::MAX.checked_shr(u32::from(bits)).unwrap_or(0);
            if value & host_mask != 0 {
                return Err(err());
            }
            return Ok(Self::Cidr(ip, bits));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        // An all-digit last label would read as a (malformed) IPv4 address.
        let numeric_tld = s
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
        if s.len() <= 253 && s.split('.').all(label_ok) && !numeric_tld {
            return Ok(Self::Name(s.to_owned()));
        }
        Err(err())
    }
}

impl fmt::Display for EgressHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Cidr(ip, bits) => write!(f, "{ip}/{bits}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

impl Serialize for EgressHost {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EgressHost {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let ports = match self.last_port {
            Some(last) if last != self.port => format!("{}-{last}", self.port),
            _ => self.port.to_string(),
        };
        match self.host {
            EgressHost::Ip(IpAddr::V6(_)) | EgressHost::Cidr(IpAddr::V6(_), _) => {
                write!(f, "[{}]:{ports}/{proto}", self.host)
            }
            _ => write!(f, "{}:{ports}/{proto}", self.host),
        }
    }
}

/// What the guest agent enforces inside the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestPolicy {
    /// The uid workloads run as (not 0).
    pub uid: u32,
    /// The gid workloads run as (not 0).
    pub gid: u32,
    /// RLIMIT_NPROC for workloads.
    pub max_processes: u32,
    /// RLIMIT_NOFILE for workloads.
    pub max_open_files: u32,
    /// RLIMIT_FSIZE for workloads, MiB.
    pub max_file_size_mib: u32,
}

/// Backend tiers, weakest first. A plan's `required_tier` is the weakest one
/// allowed to run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// A container: shares the host kernel. The weakest wall.
    Container,
    /// mvm-vmm inside a QEMU-TCG test host: the outer wall is QEMU's emulator.
    Emulated,
    /// Apple Virtualization.framework via vfkit, measured by the runtime.
    Delegated,
    /// mvm-vmm on hardware KVM, measured by the VMM.
    Hardware,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Container => "container",
            Self::Emulated => "emulated",
            Self::Delegated => "delegated",
            Self::Hardware => "hardware",
        })
    }
}

impl FromStr for Tier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "container" => Ok(Self::Container),
            "emulated" => Ok(Self::Emulated),
            "delegated" => Ok(Self::Delegated),
            "hardware" => Ok(Self::Hardware),
            other => Err(format!(
                "unknown tier {other:?} (container, emulated, delegated, hardware)"
            )),
        }
    }
}

/// Why a plan was refused before anyone acted on it.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The payload is larger than [`MAX_PLAN_BYTES`].
    #[error("plan is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A plan for a newer schema than this build understands.
    #[error("plan schema version {found} is newer than the newest this mvm understands ({supported}); upgrade mvm")]
    NewerSchema {
        /// The plan's version.
        found: u64,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// A schema version that never existed (0) or is not a number.
    #[error("plan schema version {0} is not supported")]
    BadSchema(String),
    /// A field this schema does not have.
    #[error("plan has a field the schema does not: {0}")]
    UnknownField(String),
    /// Not JSON, or not the plan's shape.
    #[error("plan does not parse: {0}")]
    Malformed(String),
    /// vCPU count out of range.
    #[error("plan asks for {value} vCPUs; allowed {MIN_VCPUS}..={MAX_VCPUS}")]
    Vcpus {
        /// The plan's value.
        value: u8,
    },
    /// Memory out of range.
    #[error("plan asks for {value} MiB of memory; allowed {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}")]
    Memory {
        /// The plan's value.
        value: u32,
    },
    /// `not_before` is not before `not_after`.
    #[error("plan validity window is empty or reversed: not_before {not_before} is not before not_after {not_after}")]
    WindowOrder {
        /// Start.
        not_before: UtcTime,
        /// End.
        not_after: UtcTime,
    },
    /// The window is longer than [`MAX_WINDOW`].
    #[error("plan validity window {not_before}..{not_after} is longer than the limit of {} s", MAX_WINDOW.as_secs())]
    WindowTooLong {
        /// Start.
        not_before: UtcTime,
        /// End.
        not_after: UtcTime,
    },
    /// Any other field that breaks a rule.
    #[error("plan field {field}: {reason}")]
    Field {
        /// JSON path of the field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a plan is not valid at the host's current time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// Too early.
    #[error("plan is not valid yet: not_before {not_before}, host time {now} (skew allowed {} s)", CLOCK_SKEW.as_secs())]
    NotYetValid {
        /// Start of the window.
        not_before: UtcTime,
        /// Host time.
        now: UtcTime,
    },
    /// Too late.
    #[error("plan has expired: not_after {not_after}, host time {now} (skew allowed {} s)", CLOCK_SKEW.as_secs())]
    Expired {
        /// End of the window.
        not_after: UtcTime,
        /// Host time.
        now: UtcTime,
    },
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> PlanError {
    PlanError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_name(field: &str, name: &str, max: usize, extra: &[u8]) -> Result<(), PlanError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b));
    if ok {
        Ok(())
    } else {
        let allowed = String::from_utf8_lossy(extra).into_owned();
        Err(field_err(
            field,
            format!(
                "{:?} must be 1..={max} characters of a-z 0-9 {allowed}",
                name.chars().take(80).collect::<String>()
            ),
        ))
    }
}

impl Plan {
    /// Parses and validates a plan payload: size, schema version (a newer one is
    /// refused as such, before any other field is looked at), unknown fields,
    /// then [`Plan::validate`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, PlanError> {
        if bytes.len() > MAX_PLAN_BYTES {
            return Err(PlanError::TooLarge {
                len: bytes.len(),
                max: MAX_PLAN_BYTES,
            });
        }
        check_schema_version(bytes)?;
        let plan: Plan = serde_json::from_slice(bytes).map_err(|e| {
            let msg = e.to_string();
            if msg.starts_with("unknown field") {
                PlanError::UnknownField(msg)
            } else {
                PlanError::Malformed(msg)
            }
        })?;
        plan.validate()?;
        Ok(plan)
    }

    /// The payload bytes to sign: compact JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, PlanError> {
        serde_json::to_vec(self).map_err(|e| PlanError::Malformed(e.to_string()))
    }

    /// Checks every rule that does not need the clock.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.schema_version != SCHEMA_VERSION {
            // from_json refuses these earlier; a hand-built plan lands here.
            return Err(PlanError::BadSchema(self.schema_version.to_string()));
        }
        check_name("plan_id", &self.plan_id, 64, b"._-")?;
        self.validate_window()?;
        let nonce_ok = self.nonce.len() % 2 == 0
            && (MIN_NONCE_BYTES * 2..=MAX_NONCE_BYTES * 2).contains(&self.nonce.len())
            && self
                .nonce
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !nonce_ok {
            return Err(field_err(
                "nonce",
                format!("must be {MIN_NONCE_BYTES}..={MAX_NONCE_BYTES} bytes as lowercase hex"),
            ));
        }
        self.validate_resources()?;
        self.validate_disks()?;
        if let Some(vsock) = &self.devices.vsock {
            if vsock.guest_cid < 3 {
                return Err(field_err(
                    "devices.vsock.guest_cid",
                    format!("{} is reserved; use 3 or more", vsock.guest_cid),
                ));
            }
            validate_forwards(&vsock.forwards)?;
        }
        if let Some(net) = &self.devices.net {
            validate_egress(&net.egress)?;
            if let Some(interface) = &net.interface {
                interface.validate()?;
            }
        }
        if self.guest.uid == 0 || self.guest.gid == 0 {
            return Err(field_err("guest", "workloads may not run as uid or gid 0"));
        }
        if self.secrets.len() > MAX_SECRETS {
            return Err(field_err(
                "secrets",
                format!("{} names; at most {MAX_SECRETS}", self.secrets.len()),
            ));
        }
        let mut seen = BTreeSet::new();
        for name in &self.secrets {
            check_secret_name(name).map_err(|reason| field_err("secrets", reason))?;
            if !seen.insert(name) {
                return Err(field_err("secrets", format!("{name:?} named twice")));
            }
        }
        if let Some(substitution) = &self.substitution {
            let allow = self.devices.net.as_ref().map(|n| &n.egress.allow[..]);
            substitution.validate(&self.secrets, allow)?;
        }
        Ok(())
    }

    fn validate_window(&self) -> Result<(), PlanError> {
        if self.not_before >= self.not_after {
            return Err(PlanError::WindowOrder {
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        let longest = self.not_before.saturating_add(MAX_WINDOW);
        if self.not_after > longest {
            return Err(PlanError::WindowTooLong {
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        Ok(())
    }

    fn validate_resources(&self) -> Result<(), PlanError> {
        let r = &self.resources;
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&r.vcpus) {
            return Err(PlanError::Vcpus { value: r.vcpus });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&r.memory_mib) {
            return Err(PlanError::Memory {
                value: r.memory_mib,
            });
        }
        if !(1..=MAX_TIMEOUT_SECS).contains(&r.timeout_secs) {
            return Err(field_err(
                "resources.timeout_secs",
                format!("{} is outside 1..={MAX_TIMEOUT_SECS}", r.timeout_secs),
            ));
        }
        Ok(())
    }

    fn validate_disks(&self) -> Result<(), PlanError> {
        let pinned = &self.artifacts.disks;
        let scratch = &self.devices.scratch_disks;
        if pinned.len() > MAX_DISKS || scratch.len() > MAX_DISKS {
            return Err(field_err(
                "disks",
                format!("at most {MAX_DISKS} of each kind"),
            ));
        }
        let mut names = BTreeSet::new();
        for disk in pinned {
            check_name("artifacts.disks.name", &disk.name, 32, b"_-")?;
            disk.verity.validate().map_err(|e| {
                field_err(
                    format!("artifacts.disks[{}].verity", disk.name),
                    e.to_string(),
                )
            })?;
            if !names.insert(disk.name.as_str()) {
                return Err(field_err(
                    "disks",
                    format!("disk name {:?} used twice", disk.name),
                ));
            }
        }
        for disk in scratch {
            check_name("devices.scratch_disks.name", &disk.name, 32, b"_-")?;
            if !(1..=1_048_576).contains(&disk.size_mib) {
                return Err(field_err(
                    format!("devices.scratch_disks[{}].size_mib", disk.name),
                    format!("{} is outside 1..=1048576", disk.size_mib),
                ));
            }
            if !names.insert(disk.name.as_str()) {
                return Err(field_err(
                    "disks",
                    format!("disk name {:?} used twice", disk.name),
                ));
            }
        }
        Ok(())
    }

    /// Checks the validity window against the host clock, allowing `skew` on
    /// either end.
    pub fn check_window(&self, now: UtcTime, skew: Duration) -> Result<(), WindowError> {
        if now < self.not_before.saturating_sub(skew) {
            return Err(WindowError::NotYetValid {
                not_before: self.not_before,
                now,
            });
        }
        if now > self.not_after.saturating_add(skew) {
            return Err(WindowError::Expired {
                not_after: self.not_after,
                now,
            });
        }
        Ok(())
    }
}

/// Secret names: `[A-Za-z0-9_.-]{1,64}`.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    check_token("secret name", name, 1..=64)
}

/// `what` is `len` bytes of `A-Z a-z 0-9 _ . -` (secret names, placeholders).
fn check_token(
    what: &str,
    token: &str,
    len: std::ops::RangeInclusive<usize>,
) -> Result<(), String> {
    let ok = len.contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {:?} must be {}..={} characters of A-Z a-z 0-9 _ . -",
            token.chars().take(80).collect::<String>(),
            len.start(),
            len.end()
        ))
    }
}

fn validate_forwards(forwards: &[PortForward]) -> Result<(), PlanError> {
    let field = "devices.vsock.forwards";
    if forwards.len() > MAX_FORWARDS {
        return Err(field_err(
            field,
            format!("{} forwards; at most {MAX_FORWARDS}", forwards.len()),
        ));
    }
    for (i, f) in forwards.iter().enumerate() {
        if f.host == 0 || f.guest == 0 {
            return Err(field_err(
                field,
                format!("port 0 in {}:{}", f.host, f.guest),
            ));
        }
        if forwards
            .iter()
            .skip(i.saturating_add(1))
            .any(|o| o.host == f.host)
        {
            return Err(field_err(
                field,
                format!("host port {} is forwarded twice", f.host),
            ));
        }
    }
    Ok(())
}

fn validate_egress(egress: &EgressPolicy) -> Result<(), PlanError> {
    if egress.allow.len() > MAX_EGRESS_RULES {
        return Err(field_err(
            "devices.net.egress.allow",
            format!("{} rules; at most {MAX_EGRESS_RULES}", egress.allow.len()),
        ));
    }
    if let Some(rule) = egress.allow.iter().find(|r| r.port == 0) {
        return Err(field_err(
            "devices.net.egress.allow",
            format!("rule for {} has port 0", rule.host),
        ));
    }
    if let Some(rule) = egress
        .allow
        .iter()
        .find(|r| r.last_port.is_some_and(|last| last < r.port))
    {
        return Err(field_err(
            "devices.net.egress.allow",
            format!(
                "rule for {} has a reversed port range {}-{}",
                rule.host,
                rule.port,
                rule.last_port.unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

/// Reads only `schema_version`, so a newer plan is refused as newer even when
/// it has fields this build does not know.
fn check_schema_version(bytes: &[u8]) -> Result<(), PlanError> {
    #[derive(Deserialize)]
    struct Probe {
        schema_version: Option<serde_json::Value>,
    }
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| PlanError::Malformed(e.to_string()))?;
    let value = probe
        .schema_version
        .ok_or_else(|| PlanError::Malformed("missing field `schema_version`".to_owned()))?;
    match value.as_u64() {
        Some(v) if v == u64::from(SCHEMA_VERSION) => Ok(()),
        Some(v) if v > u64::from(SCHEMA_VERSION) => Err(PlanError::NewerSchema {
            found: v,
            supported: SCHEMA_VERSION,
        }),
        _ => Err(PlanError::BadSchema(value.to_string())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::measure::sha256;
    use crate::verity::{RootHash, Salt};

    pub(crate) fn sample_plan() -> Plan {
        Plan {
            schema_version: SCHEMA_VERSION,
            plan_id: "p-0001".to_owned(),
            not_before: "2026-11-28T23:00:00Z".parse().unwrap(),
            not_after: "2026-11-28T23:10:00Z".parse().unwrap(),
            nonce: "00112233445566778899aabbccddeeff".to_owned(),
            artifacts: Artifacts {
                kernel: sha256(b"kernel"),
                initramfs: Some(sha256(b"initramfs")),
                cmdline: sha256(b"console=ttyS0 quiet"),
                disks: vec![PinnedDisk {
                    name: "root".to_owned(),
                    verity: VerityParams {
                        root_hash: RootHash([7; 32]),
                        salt: Salt(vec![1, 2, 3, 4]),
                        data_block_size: 4096,
                        hash_block_size: 4096,
                        data_size: 4096 * 100,
                    },
                }],
            },
            resources: Resources {
                vcpus: 2,
                memory_mib: 512,
                timeout_secs: 60,
            },
            devices: Devices {
                vsock: Some(VsockDevice::new(3)),
                scratch_disks: vec![ScratchDisk {
                    name: "scratch".to_owned(),
                    size_mib: 64,
                }],
                net: Some(NetDevice {
                    interface: Some(NetInterface {
                        mac: "02:00:0a:c8:00:02".to_owned(),
                        address: "10.200.0.2".parse().unwrap(),
                        prefix_len: 30,
                        gateway: "10.200.0.1".parse().unwrap(),
                        resolvers: vec!["10.200.0.1".parse().unwrap()],
                    }),
                    egress: EgressPolicy {
                        allow: vec![EgressRule {
                            host: "10.0.0.0/8".parse().unwrap(),
                            port: 443,
                            last_port: Some(444),
                            protocol: Protocol::Tcp,
                        }],
                    },
                }),
            },
            guest: GuestPolicy {
                uid: 1000,
                gid: 1000,
                max_processes: 256,
                max_open_files: 1024,
                max_file_size_mib: 1024,
            },
            secrets: vec!["GITHUB_TOKEN".to_owned()],
            substitution: None,
            required_tier: Tier::Emulated,
        }
    }

    fn json_with(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v = serde_json::to_value(sample_plan()).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn plan_round_trips() {
        let plan = sample_plan();
        let bytes = plan.to_json().unwrap();
        assert_eq!(Plan::from_json(&bytes).unwrap(), plan);
    }

    #[test]
    fn a_plan_with_substituted_secrets_round_trips_and_is_checked() {
        let mut plan = sample_plan();
        plan.substitution = Some(Substitution {
            ca_sha256: Sha256Digest::of(b"ca"),
            secrets: vec![SubstitutedSecret {
                name: "API_TOKEN".to_owned(),
                placeholder: "MVM_PLACEHOLDER_API_TOKEN".to_owned(),
                hosts: vec![BoundHost {
                    name: "api.example.com".to_owned(),
                    port: 443,
                    addresses: vec!["10.1.2.3".parse().unwrap()],
                }],
            }],
        });
        let bytes = plan.to_json().unwrap();
        assert_eq!(Plan::from_json(&bytes).unwrap(), plan);
        // Without it the JSON has no such key: older plans and VMMs read it as before.
        let none = sample_plan().to_json().unwrap();
        assert!(!String::from_utf8(none).unwrap().contains("substitution"));
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["substitution"]["secrets"][0]["hosts"][0]["extra"] = serde_json::json!(1);
        assert!(matches!(
            Plan::from_json(&serde_json::to_vec(&v).unwrap()),
            Err(PlanError::UnknownField(_))
        ));
        let mut no_net = plan.clone();
        no_net.devices.net = None;
        assert!(Plan::from_json(&no_net.to_json().unwrap()).is_err());
        let mut released_too = plan;
        released_too.secrets.push("API_TOKEN".to_owned());
        assert!(Plan::from_json(&released_too.to_json().unwrap()).is_err());
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level() {
        let top = json_with(|v| v["extra"] = 1.into());
        assert!(
            matches!(Plan::from_json(&top), Err(PlanError::UnknownField(m)) if m.contains("extra"))
        );
        let nested = json_with(|v| v["resources"]["gpus"] = 1.into());
        assert!(
            matches!(Plan::from_json(&nested), Err(PlanError::UnknownField(m)) if m.contains("gpus"))
        );
        let deep = json_with(|v| v["artifacts"]["disks"][0]["verity"]["hash_offset"] = 0.into());
        assert!(matches!(
            Plan::from_json(&deep),
            Err(PlanError::UnknownField(_))
        ));
    }

    #[test]
    fn newer_schema_is_refused_as_newer_even_with_new_fields() {
        let newer = json_with(|v| {
            v["schema_version"] = 2.into();
            v["attestation"] = "tpm".into();
        });
        let err = Plan::from_json(&newer).unwrap_err();
        assert!(matches!(
            err,
            PlanError::NewerSchema {
                found: 2,
                supported: 1
            }
        ));
        assert!(err.to_string().contains("newer"), "{err}");
        for bad in [
            serde_json::Value::from(0),
            "1".into(),
            (-1).into(),
            1.5.into(),
        ] {
            let b = json_with(|v| v["schema_version"] = bad.clone());
            assert!(
                matches!(Plan::from_json(&b), Err(PlanError::BadSchema(_))),
                "{bad}"
            );
        }
        let missing = json_with(|v| {
            v.as_object_mut().unwrap().remove("schema_version");
        });
        assert!(matches!(
            Plan::from_json(&missing),
            Err(PlanError::Malformed(_))
        ));
    }

    #[test]
    fn ranges_and_window_are_checked() {
        let b = json_with(|v| v["resources"]["vcpus"] = 0.into());
        assert!(matches!(
            Plan::from_json(&b),
            Err(PlanError::Vcpus { value: 0 })
        ));
        let b = json_with(|v| v["resources"]["vcpus"] = 33.into());
        assert!(matches!(
            Plan::from_json(&b),
            Err(PlanError::Vcpus { value: 33 })
        ));
        let b = json_with(|v| v["resources"]["memory_mib"] = 16.into());
        assert!(matches!(
            Plan::from_json(&b),
            Err(PlanError::Memory { value: 16 })
        ));
        let b = json_with(|v| v["not_after"] = "2026-11-28T23:00:00Z".into());
        assert!(matches!(
            Plan::from_json(&b),
            Err(PlanError::WindowOrder { .. })
        ));
        let b = json_with(|v| v["not_after"] = "2026-11-30T23:00:00Z".into());
        assert!(matches!(
            Plan::from_json(&b),
            Err(PlanError::WindowTooLong { .. })
        ));
    }

    #[test]
    fn names_nonces_and_lists_are_checked() {
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("nonce", Box::new(|v| v["nonce"] = "abcd".into())),
            (
                "nonce",
                Box::new(|v| v["nonce"] = "00112233445566778899AABBCCDDEEFF".into()),
            ),
            ("plan_id", Box::new(|v| v["plan_id"] = "../etc".into())),
            (
                "secrets",
                Box::new(|v| v["secrets"] = serde_json::json!(["A", "A"])),
            ),
            (
                "secrets",
                Box::new(|v| v["secrets"] = serde_json::json!(["a b"])),
            ),
            ("guest", Box::new(|v| v["guest"]["uid"] = 0.into())),
            (
                "guest_cid",
                Box::new(|v| v["devices"]["vsock"]["guest_cid"] = 2.into()),
            ),
            (
                "disks",
                Box::new(|v| v["devices"]["scratch_disks"][0]["name"] = "root".into()),
            ),
            (
                "port",
                Box::new(|v| v["devices"]["net"]["egress"]["allow"][0]["port"] = 0.into()),
            ),
            (
                "reversed port range",
                Box::new(|v| v["devices"]["net"]["egress"]["allow"][0]["last_port"] = 1.into()),
            ),
            (
                "interface.gateway",
                Box::new(|v| v["devices"]["net"]["interface"]["gateway"] = "10.9.9.9".into()),
            ),
        ];
        for (what, edit) in cases {
            let b = json_with(|v| edit(v));
            let err = Plan::from_json(&b).unwrap_err();
            assert!(matches!(err, PlanError::Field { .. }), "{what}: {err}");
        }
        let b =
            json_with(|v| v["devices"]["net"]["egress"]["allow"][0]["host"] = "10.0.0.1/8".into());
        assert!(matches!(Plan::from_json(&b), Err(PlanError::Malformed(_))));
    }

    #[test]
    fn oversized_and_non_json_plans_are_refused() {
        let big = vec![b' '; MAX_PLAN_BYTES + 1];
        assert!(matches!(
            Plan::from_json(&big),
            Err(PlanError::TooLarge { .. })
        ));
        assert!(matches!(
            Plan::from_json(b"\xff\xfe"),
            Err(PlanError::Malformed(_))
        ));
        assert!(matches!(
            Plan::from_json(b"[1]"),
            Err(PlanError::Malformed(_))
        ));
    }

    #[test]
    fn window_allows_the_stated_skew_and_no_more() {
        let plan = sample_plan();
        let skew = CLOCK_SKEW;
        let at = |s: &str| s.parse::<UtcTime>().unwrap();
        assert!(plan.check_window(at("2026-11-28T23:05:00Z"), skew).is_ok());
        assert!(plan.check_window(at("2026-11-28T22:59:00Z"), skew).is_ok());
        assert!(matches!(
            plan.check_window(at("2026-11-28T22:58:59Z"), skew),
            Err(WindowError::NotYetValid { .. })
        ));
        assert!(plan.check_window(at("2026-11-28T23:11:00Z"), skew).is_ok());
        assert!(matches!(
            plan.check_window(at("2026-11-28T23:11:01Z"), skew),
            Err(WindowError::Expired { .. })
        ));
    }

    #[test]
    fn net_sections_without_interface_or_ranges_still_parse() {
        let old = json_with(|v| {
            let net = v["devices"]["net"].as_object_mut().unwrap();
            net.remove("interface");
            net["egress"]["allow"][0]
                .as_object_mut()
                .unwrap()
                .remove("last_port");
        });
        let plan = Plan::from_json(&old).unwrap();
        let net = plan.devices.net.unwrap();
        assert_eq!(net.interface, None);
        assert_eq!(net.egress.allow[0].last_port, None);
        assert_eq!(net.egress.allow[0].to_string(), "10.0.0.0/8:443/tcp");
        // Absent optional fields are not written, so old plans keep their bytes.
        let written = String::from_utf8(Plan::from_json(&old).unwrap().to_json().unwrap()).unwrap();
        assert!(!written.contains("last_port") && !written.contains("interface"));
        let sample = sample_plan();
        let rule = &sample.devices.net.as_ref().unwrap().egress.allow[0];
        assert_eq!(rule.to_string(), "10.0.0.0/8:443-444/tcp");
        let unknown = json_with(|v| v["devices"]["net"]["interface"]["mtu"] = 1500.into());
        assert!(matches!(
            Plan::from_json(&unknown),
            Err(PlanError::UnknownField(_))
        ));
    }

    #[test]
    fn egress_hosts_parse_one_spelling() {
        for ok in [
            "192.0.2.7",
            "2001:db8::1",
            "10.0.0.0/8",
            "2001:db8::/32",
            "example.com",
            "a-b.c0",
        ] {
            let h: EgressHost = ok.parse().unwrap();
            assert_eq!(h.to_string(), ok);
        }
        for bad in [
            "",
            "10.0.0.1/8",
            "10.0.0.0/33",
            "Example.com",
            "-a.com",
            "a..b",
            "a_b",
            "10.0.0.0/",
            "999.1.1.1",
            "1.2.3.4/+8",
        ] {
            assert!(bad.parse::<EgressHost>().is_err(), "{bad:?}");
        }
    }
}
