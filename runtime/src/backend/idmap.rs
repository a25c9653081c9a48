//! Whose ids the container tier's users are on this host, and who writes the maps
//! (`backend::container`; `backend::detect` asks it what an ordinary user lacks).
//!
//! - **Root** runs `mvm`: the container's 0..[`ID_COUNT`] are this host's
//!   [`UID_BASE`]..: a range no account uses, written to `/proc/PID/uid_map` directly.
//! - **An ordinary user** runs it: the container's root is the user (a process that left
//!   the container would be that user, no one more), and the container's 1..[`ID_COUNT`]
//!   are the user's subordinate ids from `/etc/subuid` and `/etc/subgid`, written by the
//!   setuid helpers `newuidmap` and `newgidmap` (Debian package `uidmap`), which check
//!   the ranges against those files. This is how rootless container runtimes do it; the
//!   workload (uid 1000 inside) is one of the user's subordinate ids, so it cannot touch
//!   the user's own files.
//!
//! The id maps are the kernel's format: `INSIDE OUTSIDE COUNT` per line.

use std::path::{Path, PathBuf};
use std::process::Command;

/// When root runs `mvm`, the first of this host's uids (and gids) the container's users
/// map onto: `0` inside is this, `1000` inside is this plus 1000. A range above what
/// accounts and the usual `/etc/subuid` ranges use, so a process that left the container
/// would be nobody.
pub const UID_BASE: u32 = 0x5d00_0000;
/// How many ids a container has (0..65536 inside).
pub const ID_COUNT: u32 = 65_536;

/// Where the setuid helpers are looked for (never `PATH`: a helper found there would
/// be whatever the caller put first).
const HELPER_DIRS: [&str; 4] = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"];

/// How the container's users map onto this host's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdMap {
    /// `mvm` is root: the container's ids are `UID_BASE..`, written directly.
    Root,
    /// `mvm` is an ordinary user: the container's root is the user, the rest its
    /// subordinate ids, written by `newuidmap` and `newgidmap`.
    User {
        /// The user's uid and primary gid.
        uid: u32,
        gid: u32,
        /// The first of the subordinate uids and gids used (container id 1).
        sub_uid: u32,
        sub_gid: u32,
        /// The helpers.
        newuidmap: PathBuf,
        newgidmap: PathBuf,
    },
}

/// The first subordinate range of `name` (or of its numeric id `id`) in the text of an
/// `/etc/subuid` or `/etc/subgid`, with room for `need` ids.
pub fn subordinate_range(text: &str, name: Option<&str>, id: u32, need: u32) -> Option<u32> {
    let id = id.to_string();
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let (owner, start, count) = (fields.next()?, fields.next()?, fields.next()?);
        if fields.next().is_some() || (Some(owner) != name && owner != id) {
            return None;
        }
        let (start, count) = (start.parse::<u32>().ok()?, count.parse::<u32>().ok()?);
        // The range must not wrap around the id space.
        (count >= need && start.checked_add(need).is_some()).then_some(start)
    })
}

/// The account name of `uid` in the text of an `/etc/passwd`.
pub fn account_name(passwd: &str, uid: u32) -> Option<String> {
    let uid = uid.to_string();
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        (fields.next()? == uid).then(|| name.to_owned())
    })
}

fn helper(name: &str) -> Option<PathBuf> {
    HELPER_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

impl IdMap {
    /// The map for this process: [`IdMap::Root`] for root; for an ordinary user, its
    /// subordinate ranges and the helpers, or what is missing, said so that the user
    /// can fix it.
    pub fn for_this_process() -> Result<Self, String> {
        let uid = nix::unistd::getuid();
        if nix::unistd::geteuid().is_root() {
            return Ok(Self::Root);
        }
        let gid = nix::unistd::getgid().as_raw();
        let uid = uid.as_raw();
        let (Some(newuidmap), Some(newgidmap)) = (helper("newuidmap"), helper("newgidmap")) else {
            return Err("an ordinary user needs newuidmap and newgidmap (Debian package uidmap; scripts/setup installs it)".into());
        };
        let name = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|text| account_name(&text, uid));
        let need = ID_COUNT - 1;
        let range = |file: &str, id: u32| {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|text| subordinate_range(&text, name.as_deref(), id, need))
        };
        let Some(who) = name.clone() else {
            return Err(format!(
                "uid {uid} has no account in /etc/passwd, which newuidmap needs"
            ));
        };
        let (Some(sub_uid), Some(sub_gid)) = (range("/etc/subuid", uid), range("/etc/subgid", gid))
        else {
            return Err(format!(
                "user {who} has no range of {need} subordinate ids in /etc/subuid and /etc/subgid (as root: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {who}, with a range no other user has)"
            ));
        };
        Ok(Self::User {
            uid,
            gid,
            sub_uid,
            sub_gid,
            newuidmap,
            newgidmap,
        })
    }

    /// The host's uid and gid of the container's root (who owns what it may reach of
    /// the run directory).
    pub fn container_root(&self) -> (u32, u32) {
        match self {
            Self::Root => (UID_BASE, UID_BASE),
            Self::User { uid, gid, .. } => (*uid, *gid),
        }
    }

    /// The uid map and the gid map, as the kernel reads them.
    pub fn maps(&self) -> (String, String) {
        match self {
            Self::Root => {
                let map = format!("0 {UID_BASE} {ID_COUNT}\n");
                (map.clone(), map)
            }
            Self::User {
                uid,
                gid,
                sub_uid,
                sub_gid,
                ..
            } => {
                let rest = ID_COUNT - 1;
                (
                    format!("0 {uid} 1\n1 {sub_uid} {rest}\n"),
                    format!("0 {gid} 1\n1 {sub_gid} {rest}\n"),
                )
            }
        }
    }

    /// Writes the maps of process `pid` (which has left this host's user namespace and
    /// waits).
    pub fn apply(&self, pid: u32) -> Result<(), String> {
        let (uid_map, gid_map) = self.maps();
        match self {
            Self::Root => {
                for (file, map) in [("uid_map", uid_map), ("gid_map", gid_map)] {
                    let path = format!("/proc/{pid}/{file}");
                    std::fs::write(&path, map).map_err(|e| format!("writing {path}: {e}"))?;
                }
                Ok(())
            }
            Self::User {
                newuidmap,
                newgidmap,
                ..
            } => {
                for (helper, map) in [(newuidmap, uid_map), (newgidmap, gid_map)] {
                    let out = Command::new(helper)
                        .arg(pid.to_string())
                        .args(map.split_whitespace())
                        .env_clear()
                        .output()
                        .map_err(|e| format!("running {}: {e}", helper.display()))?;
                    if !out.status.success() {
                        return Err(format!(
                            "{} {pid} {}: {} ({})",
                            helper.display(),
                            map.split_whitespace().collect::<Vec<_>>().join(" "),
                            String::from_utf8_lossy(&out.stderr).trim(),
                            out.status
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_found_by_name_or_id_and_must_be_large_enough() {
        let text = "alice:100000:65536\n4545:300000:65536\nbob:200000:1000\n";
        assert_eq!(
            subordinate_range(text, Some("alice"), 1000, 65535),
            Some(100_000)
        );
        assert_eq!(subordinate_range(text, None, 4545, 65535), Some(300_000));
        // Too small a range is not one.
        assert_eq!(subordinate_range(text, Some("bob"), 1001, 65535), None);
        assert_eq!(subordinate_range(text, Some("carol"), 1002, 1), None);
        // Malformed and wrapping lines are skipped.
        let odd = "alice:x:65536\nalice:1:2:3\nalice:4294967295:65536\nalice:5:65536\n";
        assert_eq!(subordinate_range(odd, Some("alice"), 1, 65535), Some(5));
    }

    #[test]
    fn an_account_is_named_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(account_name(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(account_name(passwd, 0).as_deref(), Some("root"));
        assert_eq!(account_name(passwd, 7), None);
    }

    #[test]
    fn a_users_map_makes_it_the_containers_root_and_the_rest_subordinate() {
        let map = IdMap::User {
            uid: 1000,
            gid: 1001,
            sub_uid: 100_000,
            sub_gid: 200_000,
            newuidmap: "/usr/bin/newuidmap".into(),
            newgidmap: "/usr/bin/newgidmap".into(),
        };
        assert_eq!(
            map.maps(),
            (
                "0 1000 1\n1 100000 65535\n".to_owned(),
                "0 1001 1\n1 200000 65535\n".to_owned()
            )
        );
        assert_eq!(map.container_root(), (1000, 1001));
        let root = IdMap::Root;
        assert_eq!(root.maps().0, format!("0 {UID_BASE} 65536\n"));
        assert_eq!(root.container_root(), (UID_BASE, UID_BASE));
    }
}
