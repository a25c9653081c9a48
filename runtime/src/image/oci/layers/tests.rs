use std::cell::Cell;
use std::io::Write as _;

use super::*;

/// The epoch the tests write with; layer mtimes are below it unless a test
/// says otherwise.
const EPOCH: u64 = 1_700_000_000;
/// The mtime of entries built by [`Layer`].
const LAYER_MTIME: u64 = 1_600_000_000;

/// A layer tarball being built in memory.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(kind: EntryType, mode: u32, owner: u64, size: u64) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(owner);
        header.set_gid(owner);
        header.set_mtime(LAYER_MTIME);
        header.set_size(size);
        header
    }

    fn dir(mut self, path: &str, mode: u32, owner: u64) -> Self {
        let mut header = Self::header(EntryType::Directory, mode, owner, 0);
        self.0
            .append_data(&mut header, format!("{path}/"), io::empty())
            .unwrap();
        self
    }

    fn file(self, path: &str, data: &str) -> Self {
        self.file_as(path, data, 0o644, 0)
    }

    fn file_as(self, path: &str, data: &str, mode: u32, owner: u64) -> Self {
        self.file_at(path, data, mode, owner, LAYER_MTIME)
    }

    fn file_at(mut self, path: &str, data: &str, mode: u32, owner: u64, mtime: u64) -> Self {
        let mut header = Self::header(EntryType::Regular, mode, owner, data.len() as u64);
        header.set_mtime(mtime);
        self.0
            .append_data(&mut header, path, data.as_bytes())
            .unwrap();
        self
    }

    fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(EntryType::Symlink, 0o777, 0, 0);
        self.0.append_link(&mut header, path, target).unwrap();
        self
    }

    fn hard_link(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(EntryType::Link, 0o644, 0, 0);
        self.0.append_link(&mut header, path, target).unwrap();
        self
    }

    /// An entry written byte for byte, past the tar crate's path checks.
    fn raw(mut self, typeflag: u8, name: &str, link: &str, data: &str) -> Self {
        let header = raw_header(typeflag, name, link, data.len() as u64);
        self.0.append(&header, data.as_bytes()).unwrap();
        self
    }

    /// An empty regular file: how whiteouts are written.
    fn whiteout(self, path: &str) -> Self {
        self.raw(b'0', path, "", "")
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// A GNU header with `name` and `link` copied into their fields unchecked.
fn raw_header(typeflag: u8, name: &str, link: &str, size: u64) -> Header {
    let mut header = Layer::header(EntryType::new(typeflag), 0o644, 0, size);
    let old = header.as_old_mut();
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_cksum();
    header
}

/// The digest the tests give layer `index`.
fn digest(index: usize) -> String {
    format!("sha256:{index:02}ab")
}

/// A tree in a fresh spool with `layers` applied (uncompressed), in order.
fn tree_of(layers: &[Vec<u8>]) -> (tempfile::TempDir, LayerTree) {
    let spool = tempfile::tempdir().unwrap();
    let mut tree = LayerTree::new(spool.path(), Limits::default());
    for (index, layer) in layers.iter().enumerate() {
        tree.apply(&digest(index), &layer[..], Compression::None)
            .unwrap();
    }
    (spool, tree)
}

fn write(tree: &LayerTree) -> Vec<u8> {
    let mut out = Vec::new();
    tree.write_tar(&mut out, EPOCH).unwrap();
    out
}

/// One line per entry: `path kind mode uid:gid content-or-link-target`,
/// kind `d`, `f`, `l` (symlink) or `h` (hard link).
fn listing(tar: &[u8]) -> Vec<String> {
    let mut archive = tar::Archive::new(tar);
    archive
        .entries()
        .unwrap()
        .map(|entry| {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
            let link = entry
                .link_name_bytes()
                .map(|link| String::from_utf8(link.into_owned()).unwrap())
                .unwrap_or_default();
            let (kind, content) = match header.entry_type() {
                EntryType::Directory => ('d', String::new()),
                EntryType::Regular => {
                    let mut content = String::new();
                    entry.read_to_string(&mut content).unwrap();
                    ('f', content)
                }
                EntryType::Symlink => ('l', link),
                EntryType::Link => ('h', link),
                other => panic!("unexpected entry type {other:?}"),
            };
            format!(
                "{path} {kind} {:o} {}:{} {content}",
                header.mode().unwrap(),
                header.uid().unwrap(),
                header.gid().unwrap()
            )
        })
        .collect()
}

/// `(path, mtime)` of every entry.
fn mtimes(tar: &[u8]) -> Vec<(String, u64)> {
    let mut archive = tar::Archive::new(tar);
    archive
        .entries()
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
            (path, entry.header().mtime().unwrap())
        })
        .collect()
}

fn spool_files(spool: &tempfile::TempDir) -> usize {
    fs::read_dir(spool.path()).unwrap().count()
}

#[test]
fn whiteout_deletes_a_lower_file_and_the_next_layer_adds_one() {
    let base = Layer::new()
        .dir("etc", 0o755, 0)
        .file("etc/passwd", "root:x:0:0")
        .file_as("etc/shadow", "secret", 0o640, 42)
        .dir("bin", 0o755, 0)
        .file_as("bin/sh", "#!", 0o4755, 0)
        .bytes();
    let top = Layer::new()
        .whiteout("etc/.wh.shadow")
        .file_as("etc/hosts", "127.0.0.1", 0o644, 1000)
        .bytes();
    let spool = tempfile::tempdir().unwrap();
    let mut tree = LayerTree::new(spool.path(), Limits::default());
    let first = tree.apply("sha256:base", &base[..], Compression::None);
    assert_eq!(
        first.unwrap(),
        LayerStats {
            entries: 5,
            whiteouts: 0,
            bytes: 18
        }
    );
    let second = tree.apply("sha256:top", &top[..], Compression::None);
    assert_eq!(
        second.unwrap(),
        LayerStats {
            entries: 1,
            whiteouts: 1,
            bytes: 9
        }
    );

    let mut out = Vec::new();
    let stats = tree.write_tar(&mut out, EPOCH).unwrap();
    assert_eq!(
        listing(&out),
        [
            "bin/ d 755 0:0 ",
            "bin/sh f 4755 0:0 #!",
            "etc/ d 755 0:0 ",
            "etc/hosts f 644 1000:1000 127.0.0.1",
            "etc/passwd f 644 0:0 root:x:0:0",
        ]
    );
    assert_eq!(
        stats,
        TreeStats {
            entries: 5,
            bytes: 2 + 9 + 10
        }
    );
    // The whited-out content left the spool with its last path.
    assert_eq!(spool_files(&spool), 3);
}

#[test]
fn opaque_directory_keeps_only_this_layers_entries() {
    let base = Layer::new()
        .dir("opt", 0o755, 0)
        .file("opt/a", "a")
        .dir("opt/sub", 0o700, 3)
        .file("opt/sub/x", "x")
        .file("top", "t")
        .bytes();
    let top = Layer::new()
        .file("opt/before", "b")
        .file("opt/sub/y", "y")
        .whiteout("opt/.wh..wh..opq")
        .file("opt/after", "c")
        // A whiteout hides lower layers only, not its own layer's entries.
        .file("opt/mine", "m")
        .whiteout("opt/.wh.mine")
        .bytes();
    let (_spool, tree) = tree_of(&[base.clone(), top]);
    assert_eq!(
        listing(&write(&tree)),
        [
            "opt/ d 755 0:0 ",
            "opt/after f 644 0:0 c",
            "opt/before f 644 0:0 b",
            "opt/mine f 644 0:0 m",
            "opt/sub/ d 700 3:3 ",
            "opt/sub/y f 644 0:0 y",
            "top f 644 0:0 t",
        ]
    );

    // An opaque root hides every lower entry.
    let top = Layer::new()
        .file("new", "n")
        .whiteout(".wh..wh..opq")
        .bytes();
    let (_spool, tree) = tree_of(&[base, top]);
    assert_eq!(listing(&write(&tree)), ["new f 644 0:0 n"]);
}

#[test]
fn entries_replace_across_types() {
    let base = Layer::new()
        .dir("d", 0o755, 0)
        .file("d/x", "x")
        .file("f", "f")
        .dir("keep", 0o755, 0)
        .file("keep/c", "c")
        .symlink("s", "d")
        .bytes();
    let top = Layer::new()
        .file("d", "now a file")
        .dir("f", 0o700, 7)
        .file("f/y", "y")
        .dir("keep", 0o750, 5)
        .dir("s", 0o755, 0)
        .file("s/z", "z")
        .file("twice", "one")
        .file("twice", "two")
        .bytes();
    let (spool, tree) = tree_of(&[base, top]);
    assert_eq!(
        listing(&write(&tree)),
        [
            "d f 644 0:0 now a file",
            "f/ d 700 7:7 ",
            "f/y f 644 0:0 y",
            "keep/ d 750 5:5 ",
            "keep/c f 644 0:0 c",
            "s/ d 755 0:0 ",
            "s/z f 644 0:0 z",
            "twice f 644 0:0 two",
        ]
    );
    assert_eq!(spool_files(&spool), 5);
}

/// One refused layer: what the lower layers are, the hostile layer, the path
/// the error must name and the problem it must be.
struct Refusal {
    lower: Vec<Vec<u8>>,
    layer: Vec<u8>,
    path: &'static str,
    problem: fn(&EntryProblem) -> bool,
}

fn refusal(layer: Layer, path: &'static str, problem: fn(&EntryProblem) -> bool) -> Refusal {
    Refusal {
        lower: Vec::new(),
        layer: layer.bytes(),
        path,
        problem,
    }
}

fn bad_path(problem: &EntryProblem) -> bool {
    matches!(problem, EntryProblem::BadPath(_))
}

fn unsupported(problem: &EntryProblem) -> bool {
    matches!(problem, EntryProblem::UnsupportedType(_))
}

fn escapes(problem: &EntryProblem) -> bool {
    matches!(problem, EntryProblem::LinkEscapes { .. })
}

fn bad_hard_link(problem: &EntryProblem) -> bool {
    matches!(problem, EntryProblem::HardLinkTarget { .. })
}

fn through_etc(problem: &EntryProblem) -> bool {
    matches!(problem, EntryProblem::ThroughSymlink { symlink } if symlink == "etc")
}

#[test]
fn hostile_entries_are_refused_naming_layer_and_path() {
    let etc_symlink = Layer::new().symlink("etc", "/tmp").bytes();
    let cases = [
        refusal(
            Layer::new().raw(b'0', "../escape", "", "x"),
            "../escape",
            bad_path,
        ),
        refusal(
            Layer::new().raw(b'0', "a/../../b", "", "x"),
            "a/../../b",
            bad_path,
        ),
        refusal(Layer::new().raw(b'5', "./..", "", ""), "./..", bad_path),
        Refusal {
            lower: vec![etc_symlink.clone()],
            ..refusal(
                Layer::new().file("etc/passwd", "x"),
                "etc/passwd",
                through_etc,
            )
        },
        Refusal {
            lower: vec![etc_symlink],
            ..refusal(
                Layer::new().whiteout("etc/.wh.passwd"),
                "etc/.wh.passwd",
                through_etc,
            )
        },
        Refusal {
            lower: vec![Layer::new().file("a", "x").bytes()],
            ..refusal(
                Layer::new().file("a/b", "x"),
                "a/b",
                |problem| matches!(problem, EntryProblem::BelowNonDirectory { parent } if parent == "a"),
            )
        },
        refusal(Layer::new().symlink("x", "../../.."), "x", escapes),
        refusal(Layer::new().symlink("y", "/../../etc"), "y", escapes),
        refusal(
            Layer::new().symlink("usr/lib/z", "../../../etc"),
            "usr/lib/z",
            escapes,
        ),
        refusal(Layer::new().hard_link("b", "missing"), "b", bad_hard_link),
        refusal(
            Layer::new().dir("d", 0o755, 0).hard_link("b", "d"),
            "b",
            bad_hard_link,
        ),
        refusal(
            Layer::new().file("f", "x").raw(b'1', "b", "../f", ""),
            "b",
            bad_hard_link,
        ),
        refusal(
            Layer::new().raw(b'3', "dev/null", "", ""),
            "dev/null",
            unsupported,
        ),
        refusal(
            Layer::new().raw(b'4', "dev/sda", "", ""),
            "dev/sda",
            unsupported,
        ),
        refusal(Layer::new().raw(b'6', "fifo", "", ""), "fifo", unsupported),
        refusal(
            Layer::new().raw(b'S', "sparse", "", ""),
            "sparse",
            unsupported,
        ),
        refusal(Layer::new().whiteout("etc/.wh."), "etc/.wh.", bad_path),
        refusal(Layer::new().whiteout("etc/.wh..."), "etc/.wh...", bad_path),
        refusal(Layer::new().file(".wh.dir/x", "x"), ".wh.dir/x", bad_path),
        refusal(Layer::new().raw(b'0', "file/", "", ""), "file/", bad_path),
    ];
    for (index, case) in cases.into_iter().enumerate() {
        let spool = tempfile::tempdir().unwrap();
        let mut tree = LayerTree::new(spool.path(), Limits::default());
        for (lower, layer) in case.lower.iter().enumerate() {
            tree.apply(&digest(lower), &layer[..], Compression::None)
                .unwrap();
        }
        let error = tree
            .apply("sha256:hostile", &case.layer[..], Compression::None)
            .unwrap_err();
        let message = error.to_string();
        let LayerError::Entry {
            layer,
            path,
            problem,
        } = error
        else {
            panic!("case {index}: not an entry error: {message}");
        };
        assert_eq!(layer, "sha256:hostile", "case {index}");
        assert_eq!(path, case.path, "case {index}: {message}");
        assert!((case.problem)(&problem), "case {index}: {message}");
        assert!(
            message.starts_with(&format!("layer sha256:hostile: path \"{}\": ", case.path)),
            "case {index}: {message}"
        );
        // The half-applied tree is not used again.
        assert!(tree.write_tar(Vec::new(), EPOCH).is_err(), "case {index}");
        let next = tree.apply("sha256:next", &case.layer[..], Compression::None);
        assert!(next.is_err(), "case {index}");
    }
}

/// A reader that records being read and fails.
struct NoData<'a>(&'a Cell<bool>);

impl Read for NoData<'_> {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        self.0.set(true);
        Err(io::Error::other("entry data was read"))
    }
}

#[test]
fn oversized_entry_is_refused_from_its_header_alone() {
    const TEN_GIB: u64 = 10 << 30;
    let header = raw_header(b'0', "big", "", TEN_GIB);
    let touched = Cell::new(false);
    let data = header.as_bytes().chain(NoData(&touched));
    let spool = tempfile::tempdir().unwrap();
    let mut tree = LayerTree::new(spool.path(), Limits::default());
    let error = tree
        .apply("sha256:big", data, Compression::None)
        .unwrap_err();
    assert!(
        matches!(
            &error,
            LayerError::Entry {
                path,
                problem: EntryProblem::TooLarge { size: TEN_GIB, .. },
                ..
            } if path == "big"
        ),
        "{error}"
    );
    assert!(!touched.get(), "data after the header was read");
    assert!(error.to_string().contains("sha256:big"));
}

#[test]
fn limits_bound_the_whole_tree() {
    let limits = Limits {
        max_total_bytes: 10,
        ..Limits::default()
    };
    let spool = tempfile::tempdir().unwrap();
    let mut tree = LayerTree::new(spool.path(), limits);
    let first = Layer::new().file("a", "123456").bytes();
    let second = Layer::new().file("b", "123456").bytes();
    tree.apply("sha256:one", &first[..], Compression::None)
        .unwrap();
    let error = tree
        .apply("sha256:two", &second[..], Compression::None)
        .unwrap_err();
    assert!(
        matches!(
            error,
            LayerError::Entry {
                problem: EntryProblem::TotalBytes { limit: 10 },
                ..
            }
        ),
        "{error}"
    );

    // Missing parents count as paths of the tree.
    let limits = Limits {
        max_entries: 3,
        ..Limits::default()
    };
    let spool = tempfile::tempdir().unwrap();
    let mut tree = LayerTree::new(spool.path(), limits);
    let deep = Layer::new().file("a/b/c/d", "x").bytes();
    let error = tree
        .apply("sha256:deep", &deep[..], Compression::None)
        .unwrap_err();
    assert!(
        matches!(
            error,
            LayerError::Entry {
                problem: EntryProblem::TooManyEntries { limit: 3 },
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn compressed_layers_apply() {
    let tar = Layer::new()
        .dir("etc", 0o755, 0)
        .file("etc/os-release", "ID=test\n")
        .symlink("lib", "usr/lib")
        .bytes();
    let (_spool, plain) = tree_of(std::slice::from_ref(&tar));
    let expected = write(&plain);

    let gzip = |bytes: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    };
    // Two gzip members, as eStargz layers have.
    let (head, tail) = tar.split_at(700);
    let multi = [gzip(head), gzip(tail)].concat();
    let zstd = zstd::encode_all(&tar[..], 3).unwrap();
    for (compression, blob) in [
        (Compression::Gzip, gzip(&tar)),
        (Compression::Gzip, multi),
        (Compression::Zstd, zstd),
    ] {
        let spool = tempfile::tempdir().unwrap();
        let mut tree = LayerTree::new(spool.path(), Limits::default());
        tree.apply("sha256:packed", &blob[..], compression).unwrap();
        assert_eq!(write(&tree), expected, "{compression:?}");
    }

    let spool = tempfile::tempdir().unwrap();
    let mut tree = LayerTree::new(spool.path(), Limits::default());
    let error = tree
        .apply("sha256:junk", &b"not gzip at all"[..], Compression::Gzip)
        .unwrap_err();
    assert!(
        matches!(&error, LayerError::Layer { layer, .. } if layer == "sha256:junk"),
        "{error}"
    );
}

/// A reader that counts the bytes read through it.
struct Counting<'a> {
    inner: &'a [u8],
    read: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.read += read;
        Ok(read)
    }
}

#[test]
fn apply_reads_the_blob_to_its_end() {
    let mut blob = Layer::new().file("a", "x").bytes();
    blob.extend_from_slice(&[0u8; 4096]);
    let mut reader = Counting {
        inner: &blob,
        read: 0,
    };
    let spool = tempfile::tempdir().unwrap();
    let mut tree = LayerTree::new(spool.path(), Limits::default());
    tree.apply("sha256:padded", &mut reader, Compression::None)
        .unwrap();
    assert_eq!(reader.read, blob.len());
}

#[test]
fn written_tar_is_deterministic_and_clamped() {
    let long_dir = "d".repeat(120);
    let long_target = format!("/{}", "t".repeat(150));
    let layer = Layer::new()
        .file_at("deep/er/new", "n", 0o644, 0, 2_000_000_000)
        .file_at("deep/old", "o", 0o600, 0, 5)
        .dir(&long_dir, 0o755, 0)
        .file(&format!("{long_dir}/file"), "long")
        .symlink("far", &long_target)
        .bytes();
    let (_spool, tree) = tree_of(std::slice::from_ref(&layer));
    let first = write(&tree);
    assert_eq!(write(&tree), first);
    let (_other_spool, again) = tree_of(&[layer]);
    assert_eq!(write(&again), first);

    assert_eq!(
        mtimes(&first),
        [
            (format!("{long_dir}/"), LAYER_MTIME),
            (format!("{long_dir}/file"), LAYER_MTIME),
            ("deep/".to_owned(), EPOCH),
            ("deep/er/".to_owned(), EPOCH),
            ("deep/er/new".to_owned(), EPOCH),
            ("deep/old".to_owned(), 5),
            ("far".to_owned(), LAYER_MTIME),
        ]
    );
    assert!(listing(&first).contains(&format!("far l 777 0:0 {long_target}")));
    let mut archive = tar::Archive::new(&first[..]);
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        assert!(entry
            .header()
            .username_bytes()
            .unwrap_or_default()
            .is_empty());
        assert!(entry
            .header()
            .groupname_bytes()
            .unwrap_or_default()
            .is_empty());
    }
}

#[test]
fn read_file_returns_regular_files_only() {
    let layer = Layer::new()
        .file("etc/passwd", "root")
        .hard_link("etc/passwd2", "etc/passwd")
        .symlink("etc/link", "passwd")
        .dir("etc/d", 0o755, 0)
        .bytes();
    let (_spool, tree) = tree_of(&[layer]);
    let read = |path| tree.read_file(path, 100).unwrap();
    assert_eq!(read("etc/passwd").as_deref(), Some(&b"root"[..]));
    assert_eq!(read("/etc/passwd").as_deref(), Some(&b"root"[..]));
    assert_eq!(read("etc/passwd2").as_deref(), Some(&b"root"[..]));
    for none in ["etc/link", "etc", "etc/d", "nope", "etc/link/x", "/"] {
        assert_eq!(read(none), None, "{none}");
    }
    let error = tree.read_file("etc/passwd", 3).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    let error = tree.read_file("../etc/passwd", 100).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn hard_links_outlive_their_targets() {
    let base = Layer::new()
        .file("a", "content-a")
        .hard_link("b", "a")
        .hard_link("c", "a")
        .file("bin/x", "x")
        .hard_link("bin/y", "bin/x")
        .file("z", "zz")
        .hard_link("m", "z")
        .bytes();
    let top = Layer::new().whiteout(".wh.a").file("bin/x", "new").bytes();
    let (spool, tree) = tree_of(std::slice::from_ref(&base));
    assert_eq!(
        listing(&write(&tree)),
        [
            "a f 644 0:0 content-a",
            "b h 644 0:0 a",
            "bin/ d 755 0:0 ",
            "bin/x f 644 0:0 x",
            "bin/y h 644 0:0 bin/x",
            "c h 644 0:0 a",
            // The link sorts before its target: the first path is the file.
            "m f 644 0:0 zz",
            "z h 644 0:0 m",
        ]
    );
    assert_eq!(spool_files(&spool), 3);

    let (spool, tree) = tree_of(&[base, top]);
    assert_eq!(
        listing(&write(&tree)),
        [
            "b f 644 0:0 content-a",
            "bin/ d 755 0:0 ",
            "bin/x f 644 0:0 new",
            "bin/y f 644 0:0 x",
            "c h 644 0:0 b",
            "m f 644 0:0 zz",
            "z h 644 0:0 m",
        ]
    );
    assert_eq!(spool_files(&spool), 4);
}

#[test]
fn paths_and_targets_are_written_byte_for_byte() {
    // A ustar prefix holds a long directory name whose first byte is not
    // UTF-8 (Latin-1 `é`).
    let dir = [&[0xe9u8][..], &[b'a'; 120]].concat();
    let mut header = Header::new_ustar();
    header.set_entry_type(EntryType::Regular);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(LAYER_MTIME);
    header.set_size(1);
    let ustar = header.as_ustar_mut().unwrap();
    ustar.prefix[..dir.len()].copy_from_slice(&dir);
    ustar.name[..1].copy_from_slice(b"f");
    header.set_cksum();
    let mut layer = tar::Builder::new(Vec::new());
    layer.append(&header, &b"x"[..]).unwrap();
    let layer = Layer(layer).raw(b'2', "odd", "a//./b", "").bytes();
    let (_spool, tree) = tree_of(&[layer]);

    let out = write(&tree);
    let mut archive = tar::Archive::new(&out[..]);
    let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = archive
        .entries()
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let link = entry.link_name_bytes().map(|link| link.into_owned());
            (entry.path_bytes().into_owned(), link)
        })
        .collect();
    assert_eq!(
        entries,
        [
            (b"odd".to_vec(), Some(b"a//./b".to_vec())),
            ([&dir[..], b"/"].concat(), None),
            ([&dir[..], b"/f"].concat(), None),
        ]
    );
}
