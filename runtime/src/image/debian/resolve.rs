//! Dependency resolution: from root package names to the closed set of
//! packages (one version each) they need, for amd64.
//!
//! The resolver is greedy and deterministic, without backtracking. It follows
//! `Pre-Depends` and `Depends` only (not `Recommends` or `Suggests`), and
//! ignores `Conflicts` and `Breaks`: the result is what an image needs, not a
//! proof that dpkg would accept the combination. Packages are visited breadth
//! first, roots (in the order given) before essential packages (by name).
//!
//! For each dependency group (alternatives `a | b | c`):
//! 1. if an alternative is already satisfied by a selected package (by name,
//!    or through its `Provides`), nothing is added;
//! 2. else the first alternative naming a real package with a version that
//!    satisfies the constraint wins, at its highest such version;
//! 3. else the first alternative that some package provides (with a matching
//!    provided version, for a versioned dependency) wins, by the provider
//!    with the smallest name, at its highest version providing it.
//!
//! A package is selected at one version: once chosen, a later dependency its
//! version does not satisfy is an error, not a reason to pick another one.

use std::collections::{BTreeMap, VecDeque};

use super::index::{format_alternatives, Dep, PackageEntry, ARCH};
use super::version::{compare_versions, satisfies};
use super::DebianError;

/// Every candidate package of the suites and components given, for amd64
/// (architectures `amd64` and `all`).
#[derive(Debug, Clone, Default)]
pub struct Universe {
    /// Package name to its entries, highest version first, one per version.
    packages: BTreeMap<String, Vec<PackageEntry>>,
    /// Virtual package name to the entries that provide it.
    providers: BTreeMap<String, Vec<Provider>>,
}

/// One `Provides` entry of one package version.
#[derive(Debug, Clone)]
struct Provider {
    /// The providing package's name.
    package: String,
    /// The providing package's version.
    version: String,
    /// The version it provides, for `Provides: name (= version)`.
    provided: Option<String>,
}

impl Universe {
    /// Indexes `entries` (typically the `Packages` of several suites and
    /// components together). Entries for other architectures are dropped.
    /// When one name and version appears more than once (the same package in
    /// two suites), the first one given is kept.
    pub fn new(entries: Vec<PackageEntry>) -> Self {
        let mut packages: BTreeMap<String, Vec<PackageEntry>> = BTreeMap::new();
        for entry in entries {
            if entry.architecture == ARCH || entry.architecture == "all" {
                packages.entry(entry.name.clone()).or_default().push(entry);
            }
        }
        for versions in packages.values_mut() {
            // Stable: among equal versions, the first given stays first.
            versions.sort_by(|a, b| compare_versions(&b.version, &a.version));
            versions.dedup_by(|later, kept| {
                let same = compare_versions(&later.version, &kept.version).is_eq();
                if same && later.sha256 != kept.sha256 {
                    tracing::warn!(
                        package = %kept.name,
                        version = %kept.version,
                        "two different .debs for one version; keeping the first"
                    );
                }
                same
            });
        }
        let providers = index_providers(&packages);
        Self {
            packages,
            providers,
        }
    }

    /// The highest version of the package `name`.
    pub fn get(&self, name: &str) -> Option<&PackageEntry> {
        self.versions(name).first()
    }

    /// Every version of the package `name`, highest first.
    pub fn versions(&self, name: &str) -> &[PackageEntry] {
        self.packages.get(name).map_or(&[], Vec::as_slice)
    }

    /// The number of package names.
    pub fn len(&self) -> usize {
        self.packages.len()
    }

    /// Whether the universe has no packages.
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty()
    }

    /// The highest version of each package whose highest version is
    /// `Essential: yes`, by name.
    pub fn essential(&self) -> impl Iterator<Item = &PackageEntry> {
        self.packages
            .values()
            .filter_map(|versions| versions.first())
            .filter(|entry| entry.essential)
    }

    /// Whether some package provides `name`.
    fn is_provided(&self, name: &str) -> bool {
        self.providers.contains_key(name)
    }

    /// The entry of `package` at exactly `version`.
    fn entry(&self, package: &str, version: &str) -> Option<&PackageEntry> {
        self.versions(package)
            .iter()
            .find(|entry| entry.version == version)
    }

    /// A package name close to `name`, when one is trivially close (other
    /// case, or `_` for `-`).
    fn suggest(&self, name: &str) -> Option<String> {
        let dashed = name.replace('_', "-").to_ascii_lowercase();
        self.packages
            .keys()
            .chain(self.providers.keys())
            .find(|candidate| **candidate == dashed || candidate.eq_ignore_ascii_case(name))
            .cloned()
    }
}

/// Indexes the `Provides` of every entry.
fn index_providers(
    packages: &BTreeMap<String, Vec<PackageEntry>>,
) -> BTreeMap<String, Vec<Provider>> {
    let mut providers: BTreeMap<String, Vec<Provider>> = BTreeMap::new();
    for entry in packages.values().flatten() {
        for provided in &entry.provides {
            providers
                .entry(provided.name.clone())
                .or_default()
                .push(Provider {
                    package: entry.name.clone(),
                    version: entry.version.clone(),
                    provided: provided.constraint.as_ref().map(|(_, v)| v.clone()),
                });
        }
    }
    providers
}

/// Resolves `roots` (package names, real or virtual) and, when
/// `with_essential`, every essential package, to the set of packages they
/// need, sorted by name.
pub fn resolve(
    universe: &Universe,
    roots: &[String],
    with_essential: bool,
) -> Result<Vec<PackageEntry>, DebianError> {
    let mut resolver = Resolver::new(universe);
    for root in roots {
        resolver.add_root(root)?;
    }
    if with_essential {
        for entry in universe.essential() {
            if !resolver.selected.contains_key(&entry.name) {
                resolver.select(entry);
            }
        }
    }
    resolver.run()?;
    Ok(resolver.selected.into_values().cloned().collect())
}

/// The state of one resolution.
struct Resolver<'u> {
    universe: &'u Universe,
    /// The chosen version of each selected package, by name.
    selected: BTreeMap<String, &'u PackageEntry>,
    /// What the selected packages provide: virtual name to provided
    /// versions (`None` for an unversioned `Provides`).
    provided: BTreeMap<String, Vec<Option<String>>>,
    /// Selected packages whose dependencies are still to be followed.
    queue: VecDeque<&'u PackageEntry>,
}

impl<'u> Resolver<'u> {
    /// An empty resolution over `universe`.
    fn new(universe: &'u Universe) -> Self {
        Self {
            universe,
            selected: BTreeMap::new(),
            provided: BTreeMap::new(),
            queue: VecDeque::new(),
        }
    }

    /// Selects the package (or a provider of the virtual package) `name`.
    fn add_root(&mut self, name: &str) -> Result<(), DebianError> {
        if self.universe.versions(name).is_empty() && !self.universe.is_provided(name) {
            return Err(DebianError::UnknownPackage {
                name: name.to_owned(),
                suggestion: self.universe.suggest(name),
            });
        }
        let group = [Dep {
            name: name.to_owned(),
            constraint: None,
        }];
        self.satisfy("(root)", &group)
    }

    /// Follows the dependencies of every selected package until none is
    /// left.
    fn run(&mut self) -> Result<(), DebianError> {
        while let Some(entry) = self.queue.pop_front() {
            let depender = format!("{} {}", entry.name, entry.version);
            for group in entry.pre_depends.iter().chain(&entry.depends) {
                self.satisfy(&depender, group)?;
            }
        }
        Ok(())
    }

    /// Makes sure one alternative of `group` is selected.
    fn satisfy(&mut self, depender: &str, group: &[Dep]) -> Result<(), DebianError> {
        if group.iter().any(|dep| self.is_satisfied(dep)) {
            return Ok(());
        }
        let chosen = self
            .choose_real(group)
            .or_else(|| self.choose_provider(group))
            .ok_or_else(|| DebianError::Unsatisfiable {
                package: depender.to_owned(),
                dependency: format_alternatives(group),
                reason: self.explain(group),
            })?;
        self.select(chosen);
        Ok(())
    }

    /// Adds `entry` to the selection and queues its dependencies.
    fn select(&mut self, entry: &'u PackageEntry) {
        self.selected.insert(entry.name.clone(), entry);
        for provided in &entry.provides {
            let version = provided.constraint.as_ref().map(|(_, v)| v.clone());
            self.provided
                .entry(provided.name.clone())
                .or_default()
                .push(version);
        }
        self.queue.push_back(entry);
    }

    /// Whether a selected package satisfies `dep`, by name or by `Provides`.
    fn is_satisfied(&self, dep: &Dep) -> bool {
        let by_name = self
            .selected
            .get(&dep.name)
            .is_some_and(|entry| version_matches(Some(&entry.version), dep));
        by_name
            || self.provided.get(&dep.name).is_some_and(|versions| {
                versions
                    .iter()
                    .any(|version| version_matches(version.as_deref(), dep))
            })
    }

    /// The first alternative that names a real, not yet selected package
    /// with a version satisfying it, at the highest such version.
    fn choose_real(&self, group: &[Dep]) -> Option<&'u PackageEntry> {
        group
            .iter()
            .filter(|dep| !self.selected.contains_key(&dep.name))
            .find_map(|dep| {
                self.universe
                    .versions(&dep.name)
                    .iter()
                    .find(|entry| version_matches(Some(&entry.version), dep))
            })
    }

    /// The first alternative that a not yet selected package provides (at a
    /// satisfying provided version): the provider with the smallest name, at
    /// its highest version providing it.
    fn choose_provider(&self, group: &[Dep]) -> Option<&'u PackageEntry> {
        let universe = self.universe;
        group.iter().find_map(|dep| {
            let chosen = universe
                .providers
                .get(&dep.name)?
                .iter()
                .filter(|provider| !self.selected.contains_key(&provider.package))
                .filter(|provider| version_matches(provider.provided.as_deref(), dep))
                .min_by(|a, b| {
                    a.package
                        .cmp(&b.package)
                        .then_with(|| compare_versions(&b.version, &a.version))
                })?;
            tracing::debug!(virtual_package = %dep.name, provider = %chosen.package, "chose provider");
            universe.entry(&chosen.package, &chosen.version)
        })
    }

    /// Why no alternative of `group` can be satisfied, one clause per
    /// alternative.
    fn explain(&self, group: &[Dep]) -> String {
        group
            .iter()
            .map(|dep| self.explain_one(dep))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Why `dep` cannot be satisfied.
    fn explain_one(&self, dep: &Dep) -> String {
        if let Some(entry) = self.selected.get(&dep.name) {
            return format!(
                "{} {} is already selected and does not satisfy {dep}",
                entry.name, entry.version
            );
        }
        let versions = self.universe.versions(&dep.name);
        if !versions.is_empty() {
            let list: Vec<&str> = versions.iter().map(|e| e.version.as_str()).collect();
            return format!("{} has only version(s) {}", dep.name, list.join(", "));
        }
        if self.universe.is_provided(&dep.name) {
            return format!("no provider of {} satisfies {dep}", dep.name);
        }
        format!("no package {} for {ARCH} or all", dep.name)
    }
}

/// Whether a (package or provided) version satisfies `dep`'s constraint. An
/// unversioned `Provides` (`None`) satisfies only unversioned dependencies.
fn version_matches(version: Option<&str>, dep: &Dep) -> bool {
    match (&dep.constraint, version) {
        (None, _) => true,
        (Some((relation, wanted)), Some(version)) => satisfies(version, *relation, wanted),
        (Some(_), None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::index::parse_relations;
    use super::super::version::Relation;
    use super::*;

    fn package(name: &str, version: &str, depends: &str) -> PackageEntry {
        PackageEntry {
            name: name.to_owned(),
            version: version.to_owned(),
            architecture: "amd64".to_owned(),
            depends: parse_relations(depends).unwrap(),
            pre_depends: Vec::new(),
            provides: Vec::new(),
            essential: false,
            priority: None,
            filename: format!("pool/main/{name}_{version}_amd64.deb"),
            size: 1,
            sha256: "0".repeat(64),
        }
    }

    fn providing(mut entry: PackageEntry, provides: &str) -> PackageEntry {
        entry.provides = parse_relations(provides).unwrap().concat();
        entry
    }

    fn essential(mut entry: PackageEntry) -> PackageEntry {
        entry.essential = true;
        entry
    }

    fn names(entries: &[PackageEntry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| format!("{}={}", e.name, e.version))
            .collect()
    }

    fn resolve_names(universe: &Universe, roots: &[&str]) -> Vec<String> {
        let roots: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
        names(&resolve(universe, &roots, false).unwrap())
    }

    fn resolve_err(universe: &Universe, roots: &[&str]) -> DebianError {
        let roots: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
        resolve(universe, &roots, false).unwrap_err()
    }

    #[test]
    fn universe_keeps_amd64_and_all_highest_first() {
        let mut i386 = package("x", "9", "");
        i386.architecture = "i386".to_owned();
        let mut all = package("y", "1", "");
        all.architecture = "all".to_owned();
        let mut duplicate = package("x", "1.1", "");
        duplicate.sha256 = "1".repeat(64);
        let universe = Universe::new(vec![
            package("x", "1.0", ""),
            package("x", "1.1", ""),
            i386,
            all,
            duplicate,
            package("x", "1.0~rc1", ""),
        ]);
        assert_eq!(universe.len(), 2);
        assert_eq!(
            names(universe.versions("x")),
            ["x=1.1", "x=1.0", "x=1.0~rc1"]
        );
        assert_eq!(universe.get("x").unwrap().sha256, "0".repeat(64));
        assert_eq!(universe.get("y").unwrap().architecture, "all");
        assert!(universe.get("z").is_none());
    }

    #[test]
    fn follows_depends_and_pre_depends_sorted_by_name() {
        let mut bash = package("bash", "5.2", "base-files (>= 2), debianutils");
        bash.pre_depends = parse_relations("libc6 (>= 2.36)").unwrap();
        let universe = Universe::new(vec![
            bash,
            package("base-files", "12.4", ""),
            package("debianutils", "5.7", "libc6"),
            package("libc6", "2.36-9", "libgcc-s1"),
            package("libgcc-s1", "12.2", "libc6 (>= 2.35)"),
            package("unrelated", "1", ""),
        ]);
        assert_eq!(
            resolve_names(&universe, &["bash"]),
            [
                "base-files=12.4",
                "bash=5.2",
                "debianutils=5.7",
                "libc6=2.36-9",
                "libgcc-s1=12.2"
            ]
        );
    }

    #[test]
    fn cycles_terminate() {
        let universe = Universe::new(vec![
            package("a", "1", "b"),
            package("b", "1", "c"),
            package("c", "1", "a"),
        ]);
        assert_eq!(resolve_names(&universe, &["b"]), ["a=1", "b=1", "c=1"]);
    }

    #[test]
    fn alternatives_prefer_selected_then_first_satisfiable() {
        let universe = Universe::new(vec![
            package("app", "1", "mawk | gawk"),
            package("app2", "1", "gawk | mawk"),
            package("app3", "1", "missing | gawk (>= 9) | mawk"),
            package("mawk", "1.3", ""),
            package("gawk", "5.2", ""),
        ]);
        assert_eq!(resolve_names(&universe, &["app"]), ["app=1", "mawk=1.3"]);
        assert_eq!(resolve_names(&universe, &["app2"]), ["app2=1", "gawk=5.2"]);
        assert_eq!(
            resolve_names(&universe, &["mawk", "app2"]),
            ["app2=1", "mawk=1.3"]
        );
        assert_eq!(resolve_names(&universe, &["app3"]), ["app3=1", "mawk=1.3"]);
    }

    #[test]
    fn virtual_packages_use_providers() {
        let universe = Universe::new(vec![
            package("app", "1", "awk"),
            providing(package("mawk", "1.3", ""), "awk"),
            providing(package("gawk", "5.2", ""), "awk"),
            providing(package("original-awk", "2012", ""), "awk"),
        ]);
        // Smallest provider name when none is selected.
        assert_eq!(resolve_names(&universe, &["app"]), ["app=1", "gawk=5.2"]);
        // A selected provider is preferred.
        assert_eq!(
            resolve_names(&universe, &["mawk", "app"]),
            ["app=1", "mawk=1.3"]
        );
        // A virtual root.
        assert_eq!(resolve_names(&universe, &["awk"]), ["gawk=5.2"]);
    }

    #[test]
    fn real_packages_beat_providers_and_alternatives_order() {
        let universe = Universe::new(vec![
            package("app", "1", "mail-transport-agent | exim4"),
            providing(package("postfix", "3.7", ""), "mail-transport-agent"),
            package("exim4", "4.96", ""),
        ]);
        // No real package mail-transport-agent: exim4 is a real alternative.
        assert_eq!(resolve_names(&universe, &["app"]), ["app=1", "exim4=4.96"]);
        let universe = Universe::new(vec![
            package("app", "1", "mail-transport-agent | nothing-real"),
            providing(package("postfix", "3.7", ""), "mail-transport-agent"),
        ]);
        assert_eq!(resolve_names(&universe, &["app"]), ["app=1", "postfix=3.7"]);
    }

    #[test]
    fn versioned_provides() {
        let universe = Universe::new(vec![
            package("app", "1", "libfoo-abi (>= 2)"),
            providing(package("libfoo1", "1.0", ""), "libfoo-abi (= 1)"),
            providing(package("libfoo2", "2.0", ""), "libfoo-abi (= 2)"),
            providing(package("afoo", "1.0", ""), "libfoo-abi"),
        ]);
        assert_eq!(resolve_names(&universe, &["app"]), ["app=1", "libfoo2=2.0"]);
        let universe = Universe::new(vec![
            package("app", "1", "libfoo-abi (>= 2)"),
            providing(package("afoo", "1.0", ""), "libfoo-abi"),
        ]);
        let error = resolve_err(&universe, &["app"]);
        assert!(
            error.to_string().contains("no provider of libfoo-abi"),
            "{error}"
        );
    }

    #[test]
    fn highest_satisfying_version_across_suites() {
        let bookworm = vec![package("libssl3", "3.0.11-1~deb12u2", "")];
        let security = vec![package("libssl3", "3.0.15-1~deb12u1", "")];
        let universe = Universe::new([bookworm, security].concat());
        let universe_with = |depends: &str| {
            let mut entries = universe.versions("libssl3").to_vec();
            entries.push(package("app", "1", depends));
            Universe::new(entries)
        };
        assert_eq!(
            resolve_names(&universe_with("libssl3 (>= 3.0.0)"), &["app"]),
            ["app=1", "libssl3=3.0.15-1~deb12u1"]
        );
        assert_eq!(
            resolve_names(&universe_with("libssl3 (<< 3.0.15)"), &["app"]),
            ["app=1", "libssl3=3.0.11-1~deb12u2"]
        );
        assert_eq!(
            resolve_names(&universe_with("libssl3 (= 3.0.11-1~deb12u2)"), &["app"]),
            ["app=1", "libssl3=3.0.11-1~deb12u2"]
        );
    }

    #[test]
    fn unknown_root_is_an_error() {
        let universe = Universe::new(vec![package("openssh-server", "9.2", "")]);
        let error = resolve_err(&universe, &["no-such-package"]);
        assert!(
            matches!(&error, DebianError::UnknownPackage { name, suggestion: None }
                if name == "no-such-package"),
            "{error}"
        );
        let error = resolve_err(&universe, &["OpenSSH_Server"]);
        assert!(
            matches!(&error, DebianError::UnknownPackage { suggestion: Some(s), .. }
                if s == "openssh-server"),
            "{error}"
        );
        assert!(error.to_string().contains("did you mean"), "{error}");
    }

    #[test]
    fn unsatisfiable_version_names_package_dependency_and_why() {
        let universe = Universe::new(vec![
            package("app", "1.0", "libc6 (>= 2.40)"),
            package("libc6", "2.36-9", ""),
            package("libc6", "2.36-9+deb12u10", ""),
        ]);
        let error = resolve_err(&universe, &["app"]);
        let DebianError::Unsatisfiable {
            package,
            dependency,
            reason,
        } = &error
        else {
            panic!("{error}");
        };
        assert_eq!(package, "app 1.0");
        assert_eq!(dependency, "libc6 (>= 2.40)");
        assert!(reason.contains("2.36-9+deb12u10, 2.36-9"), "{reason}");
        let message = error.to_string();
        assert!(message.contains("app 1.0") && message.contains("libc6 (>= 2.40)"));
    }

    #[test]
    fn missing_dependency_and_foreign_arch_are_errors() {
        let universe = Universe::new(vec![
            package("app", "1", "ghost | libx:i386"),
            package("libx", "1", ""),
        ]);
        let error = resolve_err(&universe, &["app"]);
        assert!(
            error.to_string().contains("no package ghost")
                && error.to_string().contains("no package libx:i386"),
            "{error}"
        );
    }

    #[test]
    fn selected_version_conflict_is_an_error() {
        let universe = Universe::new(vec![
            package("a", "1", "c (= 1)"),
            package("b", "1", "c (>= 2)"),
            package("c", "1", ""),
            package("c", "2", ""),
        ]);
        let error = resolve_err(&universe, &["a", "b"]);
        assert!(
            matches!(&error, DebianError::Unsatisfiable { package, reason, .. }
                if package == "b 1" && reason.contains("c 1 is already selected")),
            "{error}"
        );
    }

    #[test]
    fn essential_packages_join_on_request() {
        let universe = Universe::new(vec![
            essential(package("dpkg", "1.21", "tar")),
            package("tar", "1.34", ""),
            essential(package("old", "1", "")),
            package("old", "2", ""),
            package("app", "1", ""),
        ]);
        let roots = vec!["app".to_owned()];
        assert_eq!(
            names(&resolve(&universe, &roots, true).unwrap()),
            ["app=1", "dpkg=1.21", "tar=1.34"]
        );
        assert_eq!(
            names(&resolve(&universe, &roots, false).unwrap()),
            ["app=1"]
        );
        assert_eq!(
            names(&resolve(&universe, &[], true).unwrap()),
            ["dpkg=1.21", "tar=1.34"]
        );
    }

    #[test]
    fn resolution_is_deterministic() {
        let entries = vec![
            package("app", "1", "awk, b | c, d"),
            providing(package("mawk", "1", ""), "awk"),
            providing(package("gawk", "1", ""), "awk"),
            package("b", "1", "d"),
            package("c", "1", ""),
            package("d", "1", "app"),
        ];
        let mut reversed = entries.clone();
        reversed.reverse();
        let forward = resolve_names(&Universe::new(entries), &["app"]);
        let backward = resolve_names(&Universe::new(reversed), &["app"]);
        assert_eq!(forward, backward);
        assert_eq!(forward, ["app=1", "b=1", "d=1", "gawk=1"]);
    }

    #[test]
    fn relation_type_is_shared() {
        let dep = Dep {
            name: "x".to_owned(),
            constraint: Some((Relation::Gt, "1".to_owned())),
        };
        assert!(version_matches(Some("2"), &dep));
        assert!(!version_matches(Some("1"), &dep));
        assert!(!version_matches(None, &dep));
    }
}
