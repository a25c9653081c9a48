//! Packages built in memory (a tiny ar writer, the tar crate, the three
//! compressors), read back through [`open_deb`] and [`TreeWriter`].

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use tar::{EntryType, Header};

use super::*;

/// The tree's SOURCE_DATE_EPOCH.
const EPOCH: u64 = 1_700_000_000;

/// An ar archive of `members`, names written with a GNU `/` when `gnu`.
fn ar_with(members: &[(&str, &[u8])], gnu: bool) -> Vec<u8> {
    let mut out = b"!<arch>\n".to_vec();
    for (name, data) in members {
        let name = if gnu {
            format!("{name}/")
        } else {
            (*name).to_owned()
        };
        let header = format!(
            "{name:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
            0,
            0,
            0,
            "100644",
            data.len()
        );
        assert_eq!(header.len(), 60);
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        if data.len() % 2 == 1 {
            out.push(b'\n');
        }
    }
    out
}

/// An ar archive of `members`.
fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
    ar_with(members, false)
}

/// `tar` compressed with `compression`.
fn compress(compression: Compression, tar: &[u8]) -> Vec<u8> {
    match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(tar).unwrap();
            encoder.finish().unwrap()
        }
        Compression::Xz => {
            let mut encoder = xz2::write::XzEncoder::new(Vec::new(), 1);
            encoder.write_all(tar).unwrap();
            encoder.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 1).unwrap(),
    }
}

/// The member-name suffix of `compression`.
fn suffix(compression: Compression) -> &'static str {
    match compression {
        Compression::None => "",
        Compression::Gzip => ".gz",
        Compression::Xz => ".xz",
        Compression::Zstd => ".zst",
    }
}

/// Builds tarballs, including entries the tar crate would refuse to write.
struct Tarball {
    builder: tar::Builder<Vec<u8>>,
}

impl Tarball {
    fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(entry_type: EntryType, mode: u32, mtime: u64, size: u64) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(entry_type);
        header.set_mode(mode);
        header.set_mtime(mtime);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_username("root").unwrap();
        header.set_groupname("root").unwrap();
        header
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut header = Self::header(EntryType::Directory, mode, EPOCH - 5, 0);
        self.builder
            .append_data(&mut header, path, std::io::empty())
            .unwrap();
        self
    }

    fn file(&mut self, path: &str, mode: u32, mtime: u64, data: &[u8]) -> &mut Self {
        self.file_owned(path, mode, mtime, data, 0)
    }

    fn file_owned(&mut self, path: &str, mode: u32, mtime: u64, data: &[u8], id: u64) -> &mut Self {
        let mut header = Self::header(EntryType::Regular, mode, mtime, data.len() as u64);
        header.set_uid(id);
        header.set_gid(id);
        self.builder.append_data(&mut header, path, data).unwrap();
        self
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut header = Self::header(EntryType::Symlink, 0o777, EPOCH - 5, 0);
        self.builder.append_link(&mut header, path, target).unwrap();
        self
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut header = Self::header(EntryType::Link, 0o644, EPOCH - 5, 0);
        self.builder.append_link(&mut header, path, target).unwrap();
        self
    }

    /// An entry written byte for byte: any path, type, size and data.
    fn raw(
        &mut self,
        path: &[u8],
        entry_type: EntryType,
        mode: u32,
        size: u64,
        data: &[u8],
    ) -> &mut Self {
        let mut header = Self::header(entry_type, mode, EPOCH - 5, size);
        header.as_old_mut().name[..path.len()].copy_from_slice(path);
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    /// A link entry written byte for byte (target unchecked).
    fn raw_link(&mut self, path: &[u8], entry_type: EntryType, target: &[u8]) -> &mut Self {
        let mut header = Self::header(entry_type, 0o644, EPOCH - 5, 0);
        header.as_old_mut().name[..path.len()].copy_from_slice(path);
        header.as_old_mut().linkname[..target.len()].copy_from_slice(target);
        header.set_cksum();
        self.builder.append(&header, std::io::empty()).unwrap();
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().unwrap()
    }
}

/// A control tarball for package `name`.
fn control_tar(name: &str) -> Vec<u8> {
    let control = format!(
        "Package: {name}\nVersion: 1.0-1\nArchitecture: amd64\n\
         Description: test package\n a longer description\n .\n with a gap\n"
    );
    Tarball::new()
        .dir("./", 0o755)
        .file("./control", 0o644, EPOCH, control.as_bytes())
        .file(
            "./md5sums",
            0o644,
            EPOCH,
            b"d41d8cd98f00b204e9800998ecf8427e  usr/bin/x\n",
        )
        .file("./postinst", 0o755, EPOCH, b"#!/bin/sh\nexit 0\n")
        .finish()
}

/// A `.deb` for package `name` with data tarball `data`.
fn deb_with(
    name: &str,
    control: Compression,
    data_compression: Compression,
    data: &[u8],
) -> Vec<u8> {
    let control_name = format!("control.tar{}", suffix(control));
    let data_name = format!("data.tar{}", suffix(data_compression));
    ar(&[
        ("debian-binary", b"2.0\n"),
        (&control_name, &compress(control, &control_tar(name))),
        (&data_name, &compress(data_compression, data)),
    ])
}

/// A `.deb` with gz control and xz data.
fn deb(name: &str, data: &[u8]) -> Vec<u8> {
    deb_with(name, Compression::Gzip, Compression::Xz, data)
}

/// Tree options with merged-usr on or off and default limits.
fn options(merged_usr: bool) -> TreeOptions {
    TreeOptions {
        source_date_epoch: EPOCH,
        merged_usr,
        limits: Limits::default(),
    }
}

/// The tree of `debs` (name, bytes) in order.
fn tree(debs: &[(&str, &[u8])], options: TreeOptions) -> Result<(Vec<u8>, TreeStats), DebError> {
    let mut writer = TreeWriter::new(Vec::new(), options).unwrap();
    for (name, bytes) in debs {
        let deb = open_deb(bytes, &options.limits)?;
        writer.add_deb(name, &deb)?;
    }
    writer.finish()
}

/// One entry of an output tree.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Out {
    path: String,
    kind: EntryType,
    mode: u32,
    uid: u64,
    mtime: u64,
    link: Option<String>,
    data: Vec<u8>,
}

/// Reads an output tree back with the tar crate.
fn read_tree(tar: &[u8]) -> Vec<Out> {
    let mut archive = tar::Archive::new(tar);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let header = entry.header().clone();
        assert_eq!(header.username_bytes(), Some(&b""[..]));
        assert_eq!(header.groupname_bytes(), Some(&b""[..]));
        let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let link = entry
            .link_name_bytes()
            .map(|link| String::from_utf8(link.into_owned()).unwrap());
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.push(Out {
            path,
            kind: header.entry_type(),
            mode: header.mode().unwrap(),
            uid: header.uid().unwrap(),
            mtime: header.mtime().unwrap(),
            link,
            data,
        });
    }
    out
}

/// A compact view of an output entry: path, type, mode, mtime, link.
fn summary(out: &[Out]) -> Vec<(String, char, u32, u64, Option<String>)> {
    out.iter()
        .map(|entry| {
            (
                entry.path.clone(),
                char::from(entry.kind.as_byte()),
                entry.mode,
                entry.mtime,
                entry.link.clone(),
            )
        })
        .collect()
}

/// The problem with the single refused entry of a one-package tree.
fn refused(data: &[u8], options: TreeOptions) -> (String, EntryProblem) {
    match tree(&[("pkg", &deb("pkg", data))], options) {
        Err(DebError::Entry {
            package,
            path,
            problem,
        }) => {
            assert_eq!(package, "pkg");
            (path, problem)
        }
        other => panic!("expected an entry error, got {other:?}"),
    }
}

const LONG_NAME: &str = "a-file-name-long-enough-to-need-a-gnu-long-name-entry-in-the-output-\
                         tree-because-it-is-over-one-hundred-bytes";

/// The data tarball of the round-trip test.
fn sample_data() -> Vec<u8> {
    let long_file = format!("./usr/share/doc/{LONG_NAME}");
    let long_target = format!("../share/doc/{LONG_NAME}");
    Tarball::new()
        .dir("./", 0o755)
        .dir("./usr/", 0o755)
        .dir("./usr/bin/", 0o755)
        .file("./usr/bin/hello", 0o4755, EPOCH + 1000, b"hello\n")
        .symlink("./usr/bin/hi", "hello")
        .hardlink("./usr/bin/hello2", "./usr/bin/hello")
        .dir("./bin/", 0o700)
        .file("./bin/sh", 0o755, 100, b"#!\n")
        .symlink("./lib", "usr/lib")
        .symlink("./sbin", "/usr/sbin/")
        .dir("./etc/", 0o755)
        .symlink("./etc/alt", "/usr/bin/hello")
        .file_owned("./etc/owned", 0o2640, EPOCH, b"x", 1000)
        .dir("./var/tmp/", 0o1777)
        .file(&long_file, 0o644, EPOCH - 1, b"doc")
        .symlink("./usr/lib/doc-link", &long_target)
        .finish()
}

#[test]
fn valid_deb_round_trips_into_the_tree() {
    let bytes = deb("hello", &sample_data());
    let deb = open_deb(&bytes, &Limits::default()).unwrap();
    assert_eq!(deb.package(), Some("hello"));
    assert_eq!(deb.data_member(), "data.tar.xz");
    assert_eq!(deb.data_compression(), Compression::Xz);
    assert_eq!(deb.control.field("version"), Some("1.0-1"));
    assert_eq!(
        deb.control.fields["Description"],
        "test package\n a longer description\n .\n with a gap"
    );
    assert_eq!(
        deb.control.files.keys().collect::<Vec<_>>(),
        ["md5sums", "postinst"]
    );
    assert_eq!(deb.control.files["postinst"], b"#!/bin/sh\nexit 0\n");

    let mut writer = TreeWriter::new(Vec::new(), options(true)).unwrap();
    let added = writer.add_deb("hello", &deb).unwrap();
    let (tar, stats) = writer.finish().unwrap();
    // Skipped: the root, usr/, usr/bin/, bin/ (now usr/bin/), lib, sbin.
    assert_eq!(
        added,
        AddStats {
            entries: 13,
            bytes: 13,
            skipped: 6
        }
    );
    assert_eq!(
        stats,
        TreeStats {
            packages: 1,
            entries: 22,
            bytes: 13
        }
    );

    let out = read_tree(&tar);
    let s = |text: &str| Some(text.to_owned());
    let e = EPOCH;
    let long_file = format!("usr/share/doc/{LONG_NAME}");
    let long_target = format!("../share/doc/{LONG_NAME}");
    let expected = vec![
        ("usr/".to_owned(), '5', 0o755, e, None),
        ("usr/bin/".to_owned(), '5', 0o755, e, None),
        ("usr/sbin/".to_owned(), '5', 0o755, e, None),
        ("usr/lib/".to_owned(), '5', 0o755, e, None),
        ("usr/lib64/".to_owned(), '5', 0o755, e, None),
        ("bin".to_owned(), '2', 0o777, e, s("usr/bin")),
        ("sbin".to_owned(), '2', 0o777, e, s("usr/sbin")),
        ("lib".to_owned(), '2', 0o777, e, s("usr/lib")),
        ("lib64".to_owned(), '2', 0o777, e, s("usr/lib64")),
        ("usr/bin/hello".to_owned(), '0', 0o4755, e, None),
        ("usr/bin/hi".to_owned(), '2', 0o777, e - 5, s("hello")),
        (
            "usr/bin/hello2".to_owned(),
            '1',
            0o644,
            e - 5,
            s("usr/bin/hello"),
        ),
        ("usr/bin/sh".to_owned(), '0', 0o755, 100, None),
        ("etc/".to_owned(), '5', 0o755, e - 5, None),
        ("etc/alt".to_owned(), '2', 0o777, e - 5, s("/usr/bin/hello")),
        ("etc/owned".to_owned(), '0', 0o2640, e, None),
        ("var/".to_owned(), '5', 0o755, e, None),
        ("var/tmp/".to_owned(), '5', 0o1777, e - 5, None),
        ("usr/share/".to_owned(), '5', 0o755, e, None),
        ("usr/share/doc/".to_owned(), '5', 0o755, e, None),
        (long_file.clone(), '0', 0o644, e - 1, None),
        (
            "usr/lib/doc-link".to_owned(),
            '2',
            0o777,
            e - 5,
            s(&long_target),
        ),
    ];
    assert_eq!(summary(&out), expected);
    let data = |path: &str| {
        out.iter()
            .find(|entry| entry.path == path)
            .unwrap()
            .data
            .clone()
    };
    assert_eq!(data("usr/bin/hello"), b"hello\n");
    assert_eq!(data("usr/bin/sh"), b"#!\n");
    assert_eq!(data(&long_file), b"doc");
    let owned = out.iter().find(|entry| entry.path == "etc/owned").unwrap();
    assert_eq!(owned.uid, 1000);
    // Two trees from the same packages are byte-identical.
    let (again, _) = tree(&[("hello", &bytes)], options(true)).unwrap();
    assert_eq!(again, tar);
}

#[test]
fn every_compression_gives_the_same_tree() {
    let data = sample_data();
    let compressions = [
        Compression::None,
        Compression::Gzip,
        Compression::Xz,
        Compression::Zstd,
    ];
    let mut trees = Vec::new();
    for (control, data_compression) in compressions.iter().zip(compressions.iter().rev()) {
        let bytes = deb_with("hello", *control, *data_compression, &data);
        let deb = open_deb(&bytes, &Limits::default()).unwrap();
        assert_eq!(deb.data_compression(), *data_compression);
        assert_eq!(deb.control.files.len(), 2);
        trees.push(tree(&[("hello", &bytes)], options(true)).unwrap().0);
    }
    assert!(trees.windows(2).all(|pair| pair[0] == pair[1]));
}

#[test]
fn without_merged_usr_paths_stay_and_alias_symlinks_are_real() {
    let data = Tarball::new()
        .dir("./", 0o755)
        .file("./bin/sh", 0o755, EPOCH, b"sh")
        .symlink("./lib", "usr/lib")
        .finish();
    let (tar, stats) = tree(&[("base", &deb("base", &data))], options(false)).unwrap();
    assert_eq!(stats.entries, 3);
    let paths: Vec<_> = read_tree(&tar).into_iter().map(|e| e.path).collect();
    assert_eq!(paths, ["bin/", "bin/sh", "lib"]);

    let through = Tarball::new()
        .symlink("./lib", "usr/lib")
        .file("./lib/libc.so", 0o644, EPOCH, b"")
        .finish();
    let (path, problem) = refused(&through, options(false));
    assert_eq!(path, "lib/libc.so");
    assert!(
        matches!(problem, EntryProblem::ThroughSymlink { ref symlink } if symlink == "lib"),
        "{problem}"
    );
}

#[test]
fn packages_merge_directories_first_metadata_wins() {
    let a = Tarball::new()
        .dir("./", 0o755)
        .dir("./etc/", 0o750)
        .file("./etc/a", 0o644, EPOCH, b"a")
        .finish();
    let b = Tarball::new()
        .dir("./", 0o755)
        .dir("./etc/", 0o700)
        .file("./etc/b", 0o644, EPOCH, b"b")
        .hardlink("./etc/b-link", "./etc/a")
        .finish();
    let (tar, stats) = tree(
        &[("a", &deb("a", &a)), ("b", &deb("b", &b))],
        options(false),
    )
    .unwrap();
    assert_eq!(stats.packages, 2);
    let out = summary(&read_tree(&tar));
    let e = EPOCH;
    assert_eq!(
        out,
        vec![
            ("etc/".to_owned(), '5', 0o750, e - 5, None),
            ("etc/a".to_owned(), '0', 0o644, e, None),
            ("etc/b".to_owned(), '0', 0o644, e, None),
            (
                "etc/b-link".to_owned(),
                '1',
                0o644,
                e - 5,
                Some("etc/a".to_owned())
            ),
        ]
    );
}

#[test]
fn refuses_dot_dot_paths() {
    let data = Tarball::new()
        .raw(b"./../etc/passwd", EntryType::Regular, 0o644, 1, b"x")
        .finish();
    let (path, problem) = refused(&data, options(true));
    assert_eq!(path, "./../etc/passwd");
    assert!(
        matches!(problem, EntryProblem::BadPath("'..' component")),
        "{problem}"
    );
    let data = Tarball::new()
        .raw(b"usr/../../x", EntryType::Directory, 0o755, 0, b"")
        .finish();
    assert!(matches!(
        refused(&data, options(true)).1,
        EntryProblem::BadPath(_)
    ));
}

#[test]
fn refuses_absolute_paths() {
    let data = Tarball::new()
        .raw(b"/etc/passwd", EntryType::Regular, 0o644, 1, b"x")
        .finish();
    let (_, problem) = refused(&data, options(true));
    assert!(
        matches!(problem, EntryProblem::BadPath("absolute")),
        "{problem}"
    );
}

#[test]
fn refuses_odd_paths() {
    for (path, entry_type) in [
        (&b"./a//b"[..], EntryType::Regular),
        (b"./a/./b", EntryType::Regular),
        (b"./etc/x/", EntryType::Regular),
        (b"./", EntryType::Regular),
    ] {
        let data = Tarball::new().raw(path, entry_type, 0o644, 0, b"").finish();
        let (_, problem) = refused(&data, options(true));
        assert!(
            matches!(problem, EntryProblem::BadPath(_)),
            "{path:?}: {problem}"
        );
    }
}

#[test]
fn refuses_a_relative_symlink_escaping_the_root() {
    let data = Tarball::new()
        .dir("./usr/", 0o755)
        .symlink("./usr/escape", "../../etc/shadow")
        .finish();
    let (path, problem) = refused(&data, options(true));
    assert_eq!(path, "usr/escape");
    assert!(
        matches!(problem, EntryProblem::LinkEscapes { .. }),
        "{problem}"
    );
    assert!(problem.to_string().contains("link escapes the tree"));
    // Merged-usr moves a link before checking it: from usr/bin, ../../x is
    // at the root, not above it.
    let data = Tarball::new().symlink("./bin/up", "../../x").finish();
    assert!(tree(&[("pkg", &deb("pkg", &data))], options(true)).is_ok());
    let data = Tarball::new().symlink("./bin/up", "../../../x").finish();
    assert!(matches!(
        refused(&data, options(true)).1,
        EntryProblem::LinkEscapes { .. }
    ));
}

#[test]
fn refuses_entries_written_through_a_symlink() {
    let data = Tarball::new()
        .dir("./opt/", 0o755)
        .symlink("./opt/link", "/etc")
        .file("./opt/link/passwd", 0o644, EPOCH, b"root::0:0::/:/bin/sh\n")
        .finish();
    let (path, problem) = refused(&data, options(true));
    assert_eq!(path, "opt/link/passwd");
    assert!(
        matches!(problem, EntryProblem::ThroughSymlink { ref symlink } if symlink == "opt/link"),
        "{problem}"
    );
    // Also across packages.
    let first = Tarball::new().symlink("./opt", "/tmp").finish();
    let second = Tarball::new().dir("./opt/sub/", 0o755).finish();
    let result = tree(
        &[("a", &deb("a", &first)), ("b", &deb("b", &second))],
        options(true),
    );
    assert!(matches!(
        result,
        Err(DebError::Entry {
            problem: EntryProblem::ThroughSymlink { .. },
            ..
        })
    ));
}

#[test]
fn refuses_a_merged_usr_alias_with_another_target() {
    let data = Tarball::new().symlink("./bin", "/opt/bin").finish();
    let (_, problem) = refused(&data, options(true));
    assert!(
        matches!(
            problem,
            EntryProblem::Duplicate {
                existing: "a directory",
                ..
            }
        ),
        "{problem}"
    );
}

#[test]
fn refuses_devices_fifos_sockets_and_sparse_files() {
    let cases = [
        (EntryType::Char, 0o644, "character device"),
        (EntryType::Block, 0o644, "block device"),
        (EntryType::Fifo, 0o644, "FIFO"),
        (EntryType::GNUSparse, 0o644, "GNU sparse file"),
        (EntryType::Regular, 0o140_644, "socket"),
        (EntryType::Continuous, 0o644, "contiguous file"),
        (EntryType::new(b'Z'), 0o644, "typeflag 'Z'"),
    ];
    for (entry_type, mode, name) in cases {
        let data = Tarball::new()
            .raw(b"./dev/thing", entry_type, mode, 0, b"")
            .finish();
        let (path, problem) = refused(&data, options(true));
        assert_eq!(path, "./dev/thing");
        match problem {
            EntryProblem::UnsupportedType(ref found) => assert!(found.contains(name), "{found}"),
            other => panic!("{name}: {other}"),
        }
    }
}

#[test]
fn refuses_hard_links_to_anything_but_an_earlier_file() {
    for target in [
        "./missing",
        "./usr",
        "./usr/bin/later",
        "../etc/passwd",
        "/etc/passwd",
    ] {
        let data = Tarball::new()
            .dir("./usr/", 0o755)
            .raw_link(b"./usr/link", EntryType::Link, target.as_bytes())
            .file("./usr/bin/later", 0o644, EPOCH, b"")
            .finish();
        let (path, problem) = refused(&data, options(true));
        assert_eq!(path, "./usr/link");
        assert!(
            matches!(problem, EntryProblem::HardLinkTarget { .. }),
            "{target}: {problem}"
        );
    }
}

#[test]
fn refuses_a_huge_entry_from_its_header() {
    let started = Instant::now();
    let data = Tarball::new()
        .raw(b"./big", EntryType::Regular, 0o644, 10 << 30, b"")
        .finish();
    let (_, problem) = refused(&data, options(true));
    assert!(
        matches!(problem, EntryProblem::TooLarge { size, limit } if size == 10 << 30 && limit == 1 << 30),
        "{problem}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_decompression_bomb_stops_at_the_total_limit() {
    let zeros = vec![0u8; 3 << 20];
    let data = Tarball::new()
        .file("./a", 0o644, EPOCH, &zeros)
        .file("./b", 0o644, EPOCH, &zeros)
        .finish();
    let bytes = deb("pkg", &data);
    assert!(bytes.len() < 64 * 1024, "the bomb compresses well");
    let mut tight = options(true);
    tight.limits.max_total_bytes = 4 << 20;
    match tree(&[("pkg", &bytes)], tight) {
        Err(DebError::Entry {
            path,
            problem: EntryProblem::TotalBytes { limit },
            ..
        }) => {
            assert_eq!(path, "b");
            assert_eq!(limit, 4 << 20);
        }
        other => panic!("{other:?}"),
    }
    // The total is over the whole tree, not per package.
    let one = Tarball::new().file("./a", 0o644, EPOCH, &zeros).finish();
    let other = Tarball::new().file("./b", 0o644, EPOCH, &zeros).finish();
    let result = tree(&[("a", &deb("a", &one)), ("b", &deb("b", &other))], tight);
    assert!(matches!(
        result,
        Err(DebError::Entry {
            problem: EntryProblem::TotalBytes { .. },
            ..
        })
    ));
}

#[test]
fn too_many_entries_are_refused() {
    let mut tarball = Tarball::new();
    for index in 0..20 {
        tarball.file(&format!("./f{index}"), 0o644, EPOCH, b"");
    }
    let data = tarball.finish();
    let mut tight = options(false);
    tight.limits.max_entries = 10;
    let (path, problem) = refused(&data, tight);
    assert_eq!(path, "f10");
    assert!(
        matches!(problem, EntryProblem::TooManyEntries { limit: 10 }),
        "{problem}"
    );
}

#[test]
fn refuses_a_duplicate_file_from_two_packages() {
    let data = Tarball::new()
        .dir("./etc/", 0o755)
        .file("./etc/config", 0o644, EPOCH, b"x")
        .finish();
    let result = tree(
        &[
            ("first", &deb("first", &data)),
            ("second", &deb("second", &data)),
        ],
        options(true),
    );
    match result {
        Err(
            error @ DebError::Entry {
                problem: EntryProblem::Duplicate { .. },
                ..
            },
        ) => {
            let message = error.to_string();
            assert!(message.starts_with("second: etc/config:"), "{message}");
            assert!(message.contains("by package first"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn refuses_conflicting_paths_within_a_package() {
    let twice = Tarball::new()
        .file("./a", 0o644, EPOCH, b"1")
        .file("./a", 0o644, EPOCH, b"2")
        .finish();
    assert!(matches!(
        refused(&twice, options(false)).1,
        EntryProblem::Duplicate { existing: "a regular file", ref first_package } if first_package == "pkg"
    ));
    let dir_over_file = Tarball::new()
        .file("./a", 0o644, EPOCH, b"1")
        .dir("./a/", 0o755)
        .finish();
    assert!(matches!(
        refused(&dir_over_file, options(false)).1,
        EntryProblem::Duplicate { .. }
    ));
    let below_file = Tarball::new()
        .file("./a", 0o644, EPOCH, b"1")
        .file("./a/b", 0o644, EPOCH, b"2")
        .finish();
    assert!(matches!(
        refused(&below_file, options(false)).1,
        EntryProblem::BelowNonDirectory { .. }
    ));
    let file_over_dir = Tarball::new()
        .dir("./a/", 0o755)
        .file("./a", 0o644, EPOCH, b"1")
        .finish();
    assert!(matches!(
        refused(&file_over_dir, options(false)).1,
        EntryProblem::Duplicate {
            existing: "a directory",
            ..
        }
    ));
}

#[test]
fn refuses_truncated_entry_data() {
    let mut data = Tarball::new()
        .file("./a", 0o644, EPOCH, &[7u8; 5000])
        .finish();
    data.truncate(512 + 1000);
    let result = tree(&[("pkg", &deb("pkg", &data))], options(false));
    assert!(
        matches!(
            result,
            Err(DebError::Entry {
                problem: EntryProblem::Read(_),
                ..
            })
        ),
        "{result:?}"
    );
}

#[test]
fn refuses_bad_extension_headers() {
    let global = Tarball::new()
        .raw(
            b"pax_global_header",
            EntryType::XGlobalHeader,
            0o644,
            0,
            b"",
        )
        .finish();
    assert!(matches!(
        refused(&global, options(false)).1,
        EntryProblem::UnsupportedType(_)
    ));
    let huge_name = vec![b'a'; 5000];
    let long = Tarball::new()
        .raw(
            b"././@LongLink",
            EntryType::GNULongName,
            0o644,
            5000,
            &huge_name,
        )
        .file("./x", 0o644, EPOCH, b"")
        .finish();
    assert!(matches!(
        refused(&long, options(false)).1,
        EntryProblem::Extension(_)
    ));
    let dangling = Tarball::new()
        .raw(b"././@LongLink", EntryType::GNULongName, 0o644, 4, b"abc\0")
        .finish();
    assert!(matches!(
        refused(&dangling, options(false)).1,
        EntryProblem::Extension(_)
    ));
    let pax = b"16 path=../evil\n";
    let pax_path = Tarball::new()
        .raw(
            b"./PaxHeaders/x",
            EntryType::XHeader,
            0o644,
            pax.len() as u64,
            pax,
        )
        .file("./x", 0o644, EPOCH, b"")
        .finish();
    let (_, problem) = refused(&pax_path, options(false));
    assert!(matches!(problem, EntryProblem::BadPath(_)), "{problem}");
    let sparse = b"22 GNU.sparse.major=1\n";
    let pax_sparse = Tarball::new()
        .raw(
            b"./PaxHeaders/x",
            EntryType::XHeader,
            0o644,
            sparse.len() as u64,
            sparse,
        )
        .file("./x", 0o644, EPOCH, b"")
        .finish();
    assert!(matches!(
        refused(&pax_sparse, options(false)).1,
        EntryProblem::UnsupportedType(_)
    ));
}

#[test]
fn pax_paths_and_times_apply() {
    let long = format!("./opt/{}", "p".repeat(200));
    let record = |text: String| {
        let body = text.len() + 2;
        let mut length = body + body.to_string().len();
        if length.to_string().len() + body != length {
            length += 1;
        }
        format!("{length} {text}\n")
    };
    let pax = [
        record(format!("path={long}")),
        record("mtime=1600000000.25".to_owned()),
        record("uid=4242".to_owned()),
    ]
    .concat();
    let data = Tarball::new()
        .raw(
            b"./PaxHeaders/x",
            EntryType::XHeader,
            0o644,
            pax.len() as u64,
            pax.as_bytes(),
        )
        .file("./short", 0o640, EPOCH + 99, b"pax")
        .finish();
    let (tar, _) = tree(&[("pkg", &deb("pkg", &data))], options(false)).unwrap();
    let out = read_tree(&tar);
    let file = out.last().unwrap();
    assert_eq!(file.path, long.trim_start_matches("./"));
    assert_eq!(file.mtime, 1_600_000_000);
    assert_eq!(file.uid, 4242);
    assert_eq!(file.data, b"pax");
    assert_eq!(out[0].path, "opt/");
}

#[test]
fn truncated_ar_is_refused() {
    let bytes = deb("pkg", &sample_data());
    match open_deb(&bytes[..bytes.len() - 10], &Limits::default()) {
        Err(DebError::Truncated { member, .. }) => assert_eq!(member, "data.tar.xz"),
        other => panic!("{other:?}"),
    }
    match open_deb(&bytes[..8 + 30], &Limits::default()) {
        Err(DebError::ArHeader { offset: 8, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        open_deb(&bytes[..8], &Limits::default()),
        Err(DebError::MissingMember("debian-binary"))
    ));
    assert!(matches!(
        open_deb(b"!<arch>", &Limits::default()),
        Err(DebError::NotAr)
    ));
    assert!(matches!(
        open_deb(b"PK\x03\x04", &Limits::default()),
        Err(DebError::NotAr)
    ));
    // A size field claiming more than the file.
    let mut lying = bytes.clone();
    lying[8 + 48..8 + 58].copy_from_slice(b"9999999999");
    assert!(matches!(
        open_deb(&lying, &Limits::default()),
        Err(DebError::Truncated { .. })
    ));
}

#[test]
fn wrong_debian_binary_is_refused() {
    let control = &compress(Compression::Gzip, &control_tar("pkg"))[..];
    let data = &compress(Compression::Xz, &sample_data())[..];
    for version in [&b"3.0\n"[..], b"2.0", b"2.\n", b"2.0\nextra", b"1.0\n"] {
        let bytes = ar(&[
            ("debian-binary", version),
            ("control.tar.gz", control),
            ("data.tar.xz", data),
        ]);
        assert!(
            matches!(
                open_deb(&bytes, &Limits::default()),
                Err(DebError::Version { .. })
            ),
            "{version:?}"
        );
    }
    let bytes = ar(&[
        ("debian-binary", b"2.9\n"),
        ("control.tar.gz", control),
        ("data.tar.xz", data),
    ]);
    assert!(open_deb(&bytes, &Limits::default()).is_ok());
    let bytes = ar(&[("control.tar.gz", control), ("debian-binary", b"2.0\n")]);
    assert!(matches!(
        open_deb(&bytes, &Limits::default()),
        Err(DebError::UnexpectedMember { .. })
    ));
}

#[test]
fn unknown_compression_is_refused() {
    let control = &compress(Compression::Gzip, &control_tar("pkg"))[..];
    let data = &compress(Compression::Xz, &sample_data())[..];
    let bytes = ar(&[
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", control),
        ("data.tar.bz2", data),
    ]);
    match open_deb(&bytes, &Limits::default()) {
        Err(DebError::UnknownCompression { member }) => assert_eq!(member, "data.tar.bz2"),
        other => panic!("{other:?}"),
    }
    let bytes = ar(&[
        ("debian-binary", b"2.0\n"),
        ("control.tar.lzma", control),
        ("data.tar.xz", data),
    ]);
    assert!(matches!(
        open_deb(&bytes, &Limits::default()),
        Err(DebError::UnknownCompression { .. })
    ));
    // A known suffix over the wrong bytes fails when the stream is read.
    let bytes = ar(&[
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", control),
        ("data.tar.zst", data),
    ]);
    let deb = open_deb(&bytes, &Limits::default()).unwrap();
    let mut writer = TreeWriter::new(Vec::new(), options(true)).unwrap();
    assert!(matches!(
        writer.add_deb("pkg", &deb),
        Err(DebError::Stream { .. })
    ));
}

#[test]
fn ar_layout_rules() {
    let control = &compress(Compression::Gzip, &control_tar("pkg"))[..];
    let data = &sample_data()[..];
    // GNU '/' terminators and an odd-sized member (padded) are fine, and so
    // are ignorable `_` members.
    let bytes = ar_with(
        &[
            ("debian-binary", b"2.0\n"),
            ("_gpgorigin", b"odd"),
            ("control.tar.gz", control),
            ("data.tar", data),
            ("_trailer", b"x"),
        ],
        true,
    );
    assert!(open_deb(&bytes, &Limits::default()).is_ok());
    for members in [
        &[
            ("debian-binary", &b"2.0\n"[..]),
            ("control.tar.gz", control),
        ][..],
        &[
            ("debian-binary", &b"2.0\n"[..]),
            ("control.tar.gz", control),
            ("data.tar", data),
            ("extra", b""),
        ],
        &[
            ("debian-binary", &b"2.0\n"[..]),
            ("data.tar", data),
            ("control.tar.gz", control),
        ],
    ] {
        assert!(open_deb(&ar(members), &Limits::default()).is_err());
    }
    // A pad byte that is not '\n'.
    let mut bad_pad = ar(&[
        ("debian-binary", b"2.0\n"),
        ("_x", b"odd"),
        ("control.tar.gz", control),
    ]);
    let pad = 8 + 60 + 4 + 60 + 3;
    assert_eq!(bad_pad[pad], b'\n');
    bad_pad[pad] = b'X';
    assert!(matches!(
        open_deb(&bad_pad, &Limits::default()),
        Err(DebError::ArHeader { .. })
    ));
}

#[test]
fn control_tarball_rules() {
    let data = &sample_data()[..];
    let with_control = |control: Vec<u8>| {
        ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar", &control),
            ("data.tar", data),
        ])
    };
    let nested = Tarball::new()
        .file("./control", 0o644, EPOCH, b"Package: x\n")
        .file("./sub/file", 0o644, EPOCH, b"")
        .finish();
    assert!(matches!(
        open_deb(&with_control(nested), &Limits::default()),
        Err(DebError::Entry {
            problem: EntryProblem::BadPath(_),
            ..
        })
    ));
    let link = Tarball::new()
        .file("./control", 0o644, EPOCH, b"Package: x\n")
        .symlink("./postinst", "/bin/sh")
        .finish();
    assert!(matches!(
        open_deb(&with_control(link), &Limits::default()),
        Err(DebError::Entry {
            problem: EntryProblem::UnsupportedType(_),
            ..
        })
    ));
    let missing = Tarball::new().file("./md5sums", 0o644, EPOCH, b"").finish();
    assert!(matches!(
        open_deb(&with_control(missing), &Limits::default()),
        Err(DebError::Control { .. })
    ));
    let bad_fields = Tarball::new()
        .file("./control", 0o644, EPOCH, b"Package: x\nPackage: y\n")
        .finish();
    assert!(matches!(
        open_deb(&with_control(bad_fields), &Limits::default()),
        Err(DebError::Control { .. })
    ));
    let big = Tarball::new()
        .file("./control", 0o644, EPOCH, b"Package: x\n")
        .file("./postinst", 0o644, EPOCH, &[b'#'; 2048])
        .finish();
    let limits = Limits {
        max_control_bytes: 1024,
        ..Limits::default()
    };
    assert!(matches!(
        open_deb(&with_control(big), &limits),
        Err(DebError::Entry {
            problem: EntryProblem::TooLarge { .. },
            ..
        })
    ));
}

/// A small deterministic generator for the mutation test.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(bound).unwrap()).unwrap()
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

/// Runs a package through both stages; errors are fine, panics are not.
fn exercise(bytes: &[u8]) {
    let limits = Limits {
        max_total_bytes: 1 << 20,
        max_entry_bytes: 1 << 20,
        ..Limits::default()
    };
    if let Ok(deb) = open_deb(bytes, &limits) {
        let mut writer = TreeWriter::new(
            Vec::new(),
            TreeOptions {
                source_date_epoch: EPOCH,
                merged_usr: true,
                limits,
            },
        )
        .unwrap();
        if writer.add_deb("fuzz", &deb).is_ok() {
            let (tar, _) = writer.finish().unwrap();
            // Whatever was accepted reads back cleanly.
            let _ = read_tree(&tar);
        }
    }
}

#[test]
fn mutated_packages_never_panic() {
    let seeds = [
        deb_with("seed", Compression::None, Compression::None, &sample_data()),
        deb_with("seed", Compression::Gzip, Compression::Gzip, &sample_data()),
    ];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for seed in &seeds {
        for _ in 0..400 {
            let mut bytes = seed.clone();
            for _ in 0..1 + rng.below(4) {
                match rng.below(4) {
                    0 => {
                        let at = rng.below(bytes.len());
                        bytes[at] = rng.byte();
                    }
                    1 => {
                        let at = rng.below(bytes.len());
                        bytes[at] ^= 1 << rng.below(8);
                    }
                    2 => {
                        let at = rng.below(bytes.len());
                        bytes.truncate(at.max(8));
                    }
                    _ => {
                        let at = rng.below(bytes.len());
                        bytes.insert(at, rng.byte());
                    }
                }
            }
            exercise(&bytes);
        }
    }
}

#[test]
fn long_and_non_utf8_paths_are_kept_byte_for_byte() {
    let mut path = b"./opt/".to_vec();
    path.extend_from_slice(&[0xff; 150]);
    let mut long_name = path.clone();
    long_name.push(0);
    let mut target = b"../".to_vec();
    target.extend_from_slice(&[0xfe; 120]);
    let mut long_link = target.clone();
    long_link.push(0);
    let data = Tarball::new()
        .raw(
            b"././@LongLink",
            EntryType::GNULongName,
            0o644,
            long_name.len() as u64,
            &long_name,
        )
        .raw(
            b"././@LongLink",
            EntryType::GNULongLink,
            0o644,
            long_link.len() as u64,
            &long_link,
        )
        .raw_link(b"placeholder", EntryType::Symlink, b"x")
        .finish();
    let (tar, _) = tree(&[("pkg", &deb("pkg", &data))], options(false)).unwrap();
    let mut archive = tar::Archive::new(&tar[..]);
    let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = archive
        .entries()
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.path_bytes().into_owned(),
                entry.link_name_bytes().map(|link| link.into_owned()),
            )
        })
        .collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0], (b"opt/".to_vec(), None));
    assert_eq!(entries[1], (path[2..].to_vec(), Some(target)));
}

#[test]
fn refuses_ids_beyond_32_bits() {
    let data = Tarball::new()
        .file_owned("./big-uid", 0o644, EPOCH, b"", 1 << 40)
        .finish();
    assert!(matches!(
        refused(&data, options(false)).1,
        EntryProblem::Header(_)
    ));
}
