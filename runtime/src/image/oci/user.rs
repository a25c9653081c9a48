//! An OCI config's `User` (`uid`, `uid:gid`, `name`, `name:group`, ...) resolved to
//! numbers against the image's own `/etc/passwd` and `/etc/group`, as a container
//! runtime would: no `User` is root; a user without a group takes the primary group
//! its passwd line gives (0 when the uid has no line).

use super::layers::LayerTree;

/// The largest `/etc/passwd` or `/etc/group` read.
const MAX_DB_BYTES: u64 = 1 << 20;

/// Why a `User` could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A name the image's database does not have.
    #[error("the image's User {user:?}: {what} {name:?} is not in the image's /etc/{db}")]
    Unknown {
        /// The config's `User`.
        user: String,
        /// `user` or `group`.
        what: &'static str,
        /// The name.
        name: String,
        /// `passwd` or `group`.
        db: &'static str,
    },
    /// Not `USER[:GROUP]`.
    #[error("the image's User {0:?} is not USER[:GROUP]")]
    Malformed(String),
    /// The database could not be read from the tree.
    #[error("the image's /etc/{db}: {source}")]
    Read {
        /// `passwd` or `group`.
        db: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// `user` (the config's `User`) as `(uid, gid)`, names looked up in `tree`.
pub fn resolve(user: Option<&str>, tree: &LayerTree) -> Result<(u32, u32), UserError> {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Ok((0, 0));
    };
    let read = |db: &'static str| {
        tree.read_file(&format!("etc/{db}"), MAX_DB_BYTES)
            .map(|bytes| bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .map_err(|source| UserError::Read { db, source })
    };
    resolve_with(user, read("passwd")?.as_deref(), read("group")?.as_deref())
}

/// [`resolve`] over the databases' texts (`None`: the image has no such file).
pub fn resolve_with(
    user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<(u32, u32), UserError> {
    let (name, grp) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if name.is_empty() || grp.is_some_and(str::is_empty) || user.contains(['\n', '\0']) {
        return Err(UserError::Malformed(user.to_owned()));
    }
    // passwd: name:password:uid:gid:...
    let users: Vec<(&str, u32, u32)> = passwd
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let n = f.next()?;
            let _ = f.next()?;
            let uid = f.next()?.parse().ok()?;
            let gid = f.next()?.parse().ok()?;
            Some((n, uid, gid))
        })
        .collect();
    let unknown = |what, name: &str, db| UserError::Unknown {
        user: user.to_owned(),
        what,
        name: name.to_owned(),
        db,
    };
    let (uid, primary) = match name.parse::<u32>() {
        Ok(uid) => (uid, users.iter().find(|u| u.1 == uid).map_or(0, |u| u.2)),
        Err(_) => users
            .iter()
            .find(|u| u.0 == name)
            .map(|u| (u.1, u.2))
            .ok_or_else(|| unknown("user", name, "passwd"))?,
    };
    let gid = match grp {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .unwrap_or_default()
                .lines()
                .find_map(|line| {
                    let mut f = line.split(':');
                    (f.next()? == g).then_some(())?;
                    let _ = f.next()?;
                    f.next()?.parse().ok()
                })
                .ok_or_else(|| unknown("group", g, "group"))?,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1001:1002::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\n";

    #[test]
    fn names_and_numbers_resolve_as_a_container_runtime_would() {
        let r = |u| resolve_with(u, Some(PASSWD), Some(GROUP));
        assert_eq!(r("app").unwrap(), (1001, 1002));
        assert_eq!(r("app:staff").unwrap(), (1001, 50));
        assert_eq!(r("1001").unwrap(), (1001, 1002));
        assert_eq!(r("4242").unwrap(), (4242, 0));
        assert_eq!(r("4242:4343").unwrap(), (4242, 4343));
        assert_eq!(r("root").unwrap(), (0, 0));
    }

    #[test]
    fn unknown_names_and_odd_forms_are_refused() {
        let r = |u| resolve_with(u, Some(PASSWD), Some(GROUP));
        assert!(r("nobody")
            .unwrap_err()
            .to_string()
            .contains("\"nobody\" is not in the image's /etc/passwd"));
        assert!(r("app:wheel")
            .unwrap_err()
            .to_string()
            .contains("/etc/group"));
        assert!(matches!(r(":5"), Err(UserError::Malformed(_))));
        assert!(matches!(r("5:"), Err(UserError::Malformed(_))));
        assert!(resolve_with("app", None, None).is_err());
    }
}
