//! What the agent lets a request do: which users a workload may run as, and its limits.

/// The agent's in-guest policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The uid a workload runs as when the request names none.
    pub default_uid: u32,
    /// The gid a workload runs as when the request names none.
    pub default_gid: u32,
    /// Whether a request may ask for uid or gid 0.
    pub allow_root: bool,
    /// Resource limits applied to every workload.
    pub limits: Limits,
}

/// Resource limits (`setrlimit`) for a workload; each is both the soft and the hard limit,
/// capped at the agent's own hard limit (a limit is only ever lowered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `RLIMIT_NOFILE`: open files.
    pub nofile: u64,
    /// `RLIMIT_NPROC`: processes of the workload's uid.
    pub nproc: u64,
    /// `RLIMIT_CORE`: core dump size (0: none).
    pub core: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            nofile: 4096,
            nproc: 4096,
            core: 0,
        }
    }
}

pub use crate::protocol::DEFAULT_WORKLOAD_ID;

impl Default for Policy {
    fn default() -> Self {
        Self {
            default_uid: DEFAULT_WORKLOAD_ID,
            default_gid: DEFAULT_WORKLOAD_ID,
            allow_root: false,
            limits: Limits::default(),
        }
    }
}

/// Why a request's identity is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("running as uid {uid} gid {gid} is refused: the agent policy does not allow root (mvm.agent.allow_root=1)")]
pub struct RootRefused {
    /// Requested uid.
    pub uid: u32,
    /// Requested gid.
    pub gid: u32,
}

impl Policy {
    /// Reads `mvm.agent.*` settings from a kernel command line over the defaults:
    /// `allow_root=1`, `uid=N`, `gid=N`, `nofile=N`, `nproc=N`. Malformed values are
    /// ignored (the default stays), since the command line is measured and pinned by the plan.
    pub fn from_cmdline(cmdline: &str) -> Self {
        let mut policy = Self::default();
        for word in cmdline.split_ascii_whitespace() {
            let Some(setting) = word.strip_prefix("mvm.agent.") else {
                continue;
            };
            let Some((key, value)) = setting.split_once('=') else {
                continue;
            };
            let number = value.parse::<u64>().ok();
            let id = value.parse::<u32>().ok();
            match key {
                "allow_root" => policy.allow_root = value == "1" || value == "true",
                "uid" => policy.default_uid = id.unwrap_or(policy.default_uid),
                "gid" => policy.default_gid = id.unwrap_or(policy.default_gid),
                "nofile" => policy.limits.nofile = number.unwrap_or(policy.limits.nofile),
                "nproc" => policy.limits.nproc = number.unwrap_or(policy.limits.nproc),
                _ => {}
            }
        }
        policy
    }

    /// The uid and gid a workload runs as, given what the request asked for.
    ///
    /// A request that names a uid but no gid gets the gid of the same number.
    pub fn identity(&self, uid: Option<u32>, gid: Option<u32>) -> Result<(u32, u32), RootRefused> {
        let resolved_uid = uid.unwrap_or(self.default_uid);
        let resolved_gid = match (uid, gid) {
            (_, Some(gid)) => gid,
            (Some(uid), None) => uid,
            (None, None) => self.default_gid,
        };
        if (resolved_uid == 0 || resolved_gid == 0) && !self.allow_root {
            return Err(RootRefused {
                uid: resolved_uid,
                gid: resolved_gid,
            });
        }
        Ok((resolved_uid, resolved_gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_overrides_defaults() {
        let p = Policy::from_cmdline(
            "console=ttyS0 mvm.agent.allow_root=1 mvm.agent.uid=2000 mvm.agent.nofile=64 quiet",
        );
        assert!(p.allow_root);
        assert_eq!(p.default_uid, 2000);
        assert_eq!(p.default_gid, DEFAULT_WORKLOAD_ID);
        assert_eq!(p.limits.nofile, 64);
    }

    #[test]
    fn malformed_cmdline_values_keep_defaults() {
        let p = Policy::from_cmdline("mvm.agent.uid=-1 mvm.agent.allow_root=yes mvm.agent.gid");
        assert_eq!(p, Policy::default());
    }

    #[test]
    fn root_needs_policy() {
        let p = Policy::default();
        assert_eq!(p.identity(None, None), Ok((1000, 1000)));
        assert_eq!(p.identity(Some(1234), None), Ok((1234, 1234)));
        assert_eq!(
            p.identity(Some(0), None),
            Err(RootRefused { uid: 0, gid: 0 })
        );
        assert!(p.identity(Some(5), Some(0)).is_err());
        let root_ok = Policy {
            allow_root: true,
            ..Policy::default()
        };
        assert_eq!(root_ok.identity(Some(0), None), Ok((0, 0)));
    }
}
