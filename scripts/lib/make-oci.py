#!/usr/bin/env python3
"""Writes the OCI archives scripts/check-images imports (no registry, no docker).

    make-oci.py good OUT.tar BUSYBOX      an OCI layout, as a tar: two layers (the second
                                          deletes a file of the first by whiteout),
                                          Entrypoint, Cmd, Env, WorkingDir and User
    make-oci.py docker OUT.tar BUSYBOX    the same image as a `docker save` archive
    make-oci.py HOSTILE OUT.tar           a one- or two-layer OCI layout whose last layer
                                          is hostile: dotdot, device, symlink-escape,
                                          through-symlink, hardlink-out, huge

Everything is written deterministically (fixed times, owners and order).
"""
import gzip
import hashlib
import io
import json
import sys
import tarfile


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def entry(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, link="", uid=0, gid=0, size=None):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = 1700000000
    info.linkname = link
    info.size = len(data) if size is None else size
    return info, data


def layer(entries, raw_tail=b""):
    """An uncompressed layer tar of (TarInfo, data) pairs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue() + raw_tail


def gz(data):
    return gzip.compress(data, mtime=0)


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def config(diff_ids, run):
    return json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }, sort_keys=True).encode()


def write_oci(out, layers, run):
    """layers: list of uncompressed tars; the first is gzipped, the rest stored plain."""
    blobs = {}
    descriptors = []
    for n, plain in enumerate(layers):
        data = gz(plain) if n == 0 else plain
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if n == 0 else "")
        blobs[sha(data)] = data
        descriptors.append({"mediaType": media, "digest": sha(data), "size": len(data)})
    cfg = config([sha(p) for p in layers], run)
    blobs[sha(cfg)] = cfg
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(cfg), "size": len(cfg)},
        "layers": descriptors,
    }, sort_keys=True).encode()
    blobs[sha(manifest)] = manifest
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": sha(manifest), "size": len(manifest),
                       "platform": {"os": "linux", "architecture": "amd64"}}],
    }, sort_keys=True).encode()
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add(tar, "index.json", index)
        for digest in sorted(blobs):
            add(tar, "blobs/sha256/" + digest.split(":")[1], blobs[digest])


def write_docker(out, layers, run):
    cfg = config([sha(p) for p in layers], run)
    cfg_name = sha(cfg).split(":")[1] + ".json"
    names = ["layer%d/layer.tar" % n for n in range(len(layers))]
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": ["mvm-check:latest"],
                            "Layers": names}]).encode()
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "manifest.json", manifest)
        add(tar, cfg_name, cfg)
        for name, plain in zip(names, layers):
            add(tar, name, plain)


def good_layers(busybox):
    bb = open(busybox, "rb").read()
    d = tarfile.DIRTYPE
    first = layer([
        entry("bin", d, mode=0o755),
        entry("bin/busybox", data=bb, mode=0o755),
        *[entry("bin/" + a, tarfile.SYMTYPE, link="busybox", mode=0o777)
          for a in ("sh", "ls", "cat", "id")],
        entry("etc", d, mode=0o755),
        entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1001:1002::/data:/bin/sh\n"),
        entry("etc/group", data=b"root:x:0:\napp:x:1002:\n"),
        entry("etc/greeting", data=b"from layer one\n"),
        entry("data", d, mode=0o755, uid=1001, gid=1002),
        entry("data/old.txt", data=b"old\n", uid=1001, gid=1002),
        entry("data/keep.txt", data=b"keep\n", uid=1001, gid=1002),
    ])
    second = layer([
        entry("data/.wh.old.txt"),
        entry("data/new.txt", data=b"new\n", uid=1001, gid=1002),
    ])
    return [first, second]


GOOD_RUN = {
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ['echo "$GREETING"; pwd; ls /data; id -u; id -g; cat /etc/greeting'],
    "Env": ["GREETING=hello from oci", "PATH=/bin"],
    "WorkingDir": "/data",
    "User": "app",
}


def hostile(kind):
    d = tarfile.DIRTYPE
    base = layer([entry("etc", d, mode=0o755), entry("etc/hostname", data=b"x\n")])
    if kind == "dotdot":
        bad = layer([entry("../evil.txt", data=b"escaped\n")])
    elif kind == "device":
        info, _ = entry("dev-sda", tarfile.BLKTYPE)
        info.devmajor, info.devminor = 8, 0
        bad = layer([(info, b"")])
    elif kind == "symlink-escape":
        bad = layer([entry("up", tarfile.SYMTYPE, link="../../../../etc", mode=0o777)])
    elif kind == "through-symlink":
        return [base, layer([entry("hostetc", tarfile.SYMTYPE, link="/etc", mode=0o777)]),
                layer([entry("hostetc/evil", data=b"through\n")])]
    elif kind == "hardlink-out":
        bad = layer([entry("stolen", tarfile.LNKTYPE, link="../../etc/shadow")])
    elif kind == "huge":
        # A header claiming 10 GiB with nothing behind it.
        info, _ = entry("huge.bin", size=10 << 30)
        bad = info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024
    else:
        sys.exit("unknown archive kind " + kind)
    return [base, bad]


def main():
    kind, out = sys.argv[1], sys.argv[2]
    if kind == "good":
        write_oci(out, good_layers(sys.argv[3]), GOOD_RUN)
    elif kind == "docker":
        write_docker(out, good_layers(sys.argv[3]), GOOD_RUN)
    else:
        write_oci(out, hostile(kind), {"Cmd": ["/bin/true"]})


main()
