use std::io::Write;

use super::*;

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A one-file layer tar.
fn layer_tar(path: &str, body: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(u64::try_from(body.len()).unwrap());
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, body).unwrap();
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// An OCI layout with a gzip layer and a plain one, written into `dir`.
struct Layout {
    blobs: BTreeMap<String, Vec<u8>>,
    index: Vec<u8>,
    manifest_digest: String,
}

fn layout(config_extra: serde_json::Value) -> Layout {
    let l1 = layer_tar("a", b"one");
    let l2 = layer_tar("b", b"two");
    let l1_gz = gzip(&l1);
    let mut config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["A=1", "PATH=/bin"],
                   "WorkingDir": "/data", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": [sha(&l1), sha(&l2)]},
    });
    if let (Some(c), Some(extra)) = (config.as_object_mut(), config_extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&l1_gz), "size": l1_gz.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(&l2), "size": l2.len()},
        ],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&manifest), "size": manifest.len()}],
    }))
    .unwrap();
    let mut blobs = BTreeMap::new();
    let manifest_digest = sha(&manifest);
    for b in [l1_gz, l2, config, manifest] {
        blobs.insert(sha(&b), b);
    }
    Layout {
        blobs,
        index,
        manifest_digest,
    }
}

impl Layout {
    fn write_dir(&self, dir: &Path) {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        std::fs::write(dir.join("index.json"), &self.index).unwrap();
        for (digest, bytes) in &self.blobs {
            let hex = digest.trim_start_matches("sha256:");
            std::fs::write(dir.join("blobs/sha256").join(hex), bytes).unwrap();
        }
    }

    fn write_tar(&self, path: &Path) {
        let mut b = tar::Builder::new(File::create(path).unwrap());
        let mut add = |name: &str, bytes: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(u64::try_from(bytes.len()).unwrap());
            h.set_mode(0o644);
            b.append_data(&mut h, name, bytes).unwrap();
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add("index.json", &self.index);
        for (digest, bytes) in &self.blobs {
            add(
                &format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
                bytes,
            );
        }
        b.into_inner().unwrap().flush().unwrap();
    }
}

#[test]
fn an_oci_layout_is_read_from_a_directory_and_from_a_tar() {
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(serde_json::json!({}));
    l.write_dir(&tmp.path().join("dir"));
    l.write_tar(&tmp.path().join("image.tar"));
    for path in [tmp.path().join("dir"), tmp.path().join("image.tar")] {
        let archive = Archive::open(&path).unwrap();
        let image = archive.image().unwrap();
        assert_eq!(image.format, Format::OciLayout);
        assert_eq!(image.digest, l.manifest_digest);
        assert_eq!(image.run.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(image.run.cmd, ["echo hi"]);
        assert_eq!(image.run.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(image.run.workdir.as_deref(), Some("/data"));
        assert_eq!(image.run.user.as_deref(), Some("1000:1000"));
        assert_eq!(image.layers.len(), 2);
        let c: Vec<Compression> = image
            .layers
            .iter()
            .map(|layer| archive.verify_layer(layer, 1 << 20).unwrap())
            .collect();
        assert_eq!(c, [Compression::Gzip, Compression::None]);
    }
}

#[test]
fn a_changed_layer_byte_and_a_wrong_diff_id_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(serde_json::json!({}));
    l.write_dir(tmp.path());
    let archive = Archive::open(tmp.path()).unwrap();
    let image = archive.image().unwrap();
    // One byte of the plain layer changed: its digest no longer matches.
    let layer = image.layers.get(1).unwrap();
    let path = tmp.path().join(&layer.member);
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.get_mut(0).unwrap() ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = archive
        .verify_layer(layer, 1 << 20)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the bytes are"), "{err}");
    // A diff_id that is not the layer's.
    let mut wrong = image.layers.first().unwrap().clone();
    wrong.diff_id = sha(b"other");
    let err = archive
        .verify_layer(&wrong, 1 << 20)
        .unwrap_err()
        .to_string();
    assert!(err.contains("diff_id"), "{err}");
    // A layer bigger uncompressed than allowed.
    let err = archive
        .verify_layer(image.layers.first().unwrap(), 100)
        .unwrap_err()
        .to_string();
    assert!(err.contains("uncompressed"), "{err}");
}

#[test]
fn another_platform_and_a_changed_config_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    layout(serde_json::json!({"architecture": "arm64"})).write_dir(tmp.path());
    let err = Archive::open(tmp.path())
        .unwrap()
        .image()
        .unwrap_err()
        .to_string();
    assert!(err.contains("linux/arm64"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let mut l = layout(serde_json::json!({}));
    // The config blob swapped for other bytes under the same name.
    let manifest: serde_json::Value =
        serde_json::from_slice(l.blobs.get(&l.manifest_digest).unwrap()).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
    l.blobs.insert(config_digest, b"{}".to_vec());
    l.write_dir(tmp.path());
    let err = Archive::open(tmp.path())
        .unwrap()
        .image()
        .unwrap_err()
        .to_string();
    assert!(err.contains("config sha256:"), "{err}");
}

#[test]
fn hostile_member_names_and_odd_archives_are_refused() {
    assert!(clean_name("../x").is_err());
    assert!(clean_name("a/../../x").is_err());
    assert!(clean_name("a\0b").is_err());
    assert_eq!(clean_name("./a//b").unwrap(), "a/b");
    assert_eq!(clean_name("/a").unwrap(), "a");
    assert!(blob_name("sha256:../../etc/passwd").is_err());
    assert!(blob_name("md5:00").is_err());

    let tmp = tempfile::tempdir().unwrap();
    let err = Archive::open(tmp.path()).unwrap().image().unwrap_err();
    assert!(matches!(err, ArchiveError::Unknown(_)), "{err}");

    // A docker save whose manifest names a layer outside the archive.
    std::fs::write(
        tmp.path().join("manifest.json"),
        br#"[{"Config":"c.json","RepoTags":[],"Layers":["../../etc/passwd"]}]"#,
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("c.json"),
        br#"{"os":"linux","architecture":"amd64","rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#,
    )
    .unwrap();
    let err = Archive::open(tmp.path())
        .unwrap()
        .image()
        .unwrap_err()
        .to_string();
    assert!(err.contains("climbs"), "{err}");

    // A JSON document over the cap is not read.
    let big = vec![b' '; usize::try_from(MAX_JSON_BYTES).unwrap() + 1];
    std::fs::write(tmp.path().join("manifest.json"), big).unwrap();
    let err = Archive::open(tmp.path())
        .unwrap()
        .image()
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than"), "{err}");
}

#[test]
fn a_docker_save_archive_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let l1 = layer_tar("a", b"one");
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&l1)]},
    }))
    .unwrap();
    let config_name = format!("{}.json", sha(&config).trim_start_matches("sha256:"));
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": config_name, "RepoTags": ["x:latest"], "Layers": ["abc/layer.tar"]}
    ]))
    .unwrap();
    let path = tmp.path().join("save.tar");
    let mut b = tar::Builder::new(File::create(&path).unwrap());
    for (name, bytes) in [
        ("manifest.json", manifest.as_slice()),
        (config_name.as_str(), config.as_slice()),
        ("abc/layer.tar", l1.as_slice()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(u64::try_from(bytes.len()).unwrap());
        h.set_mode(0o644);
        b.append_data(&mut h, name, bytes).unwrap();
    }
    b.into_inner().unwrap();
    let archive = Archive::open(&path).unwrap();
    let image = archive.image().unwrap();
    assert_eq!(image.format, Format::DockerSave);
    assert_eq!(image.digest, sha(&config));
    assert_eq!(image.run.cmd, ["/bin/true"]);
    let layer = image.layers.first().unwrap();
    assert_eq!(
        archive.verify_layer(layer, 1 << 20).unwrap(),
        Compression::None
    );
    let mut bytes = Vec::new();
    archive
        .open_layer(layer)
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    assert_eq!(bytes, l1);
}
