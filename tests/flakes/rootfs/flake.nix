# A flake whose only inputs are local (no nixpkgs, no network), built by
# scripts/check-images with `mvm image build --flake DIR#ATTR --lock`; the check
# copies busybox/busybox, kernel/vmlinux (mvm's own guest kernel) and the
# repository's nix/lib.nix (as mvm-lib.nix) beside it.
#
#   rootfs      a root filesystem tree: mvm's lib.mkImage over the static busybox,
#               with a build step of its own
#   withKernel  a kernel plus a root filesystem (`vmlinux` and `rootfs/`): the same
#               tree, and the kernel with a marker appended (so that its digest is
#               its own, and it still boots)
#   notATree    a single file: refused, it is no root filesystem
{
  description = "mvm test: root filesystems from a static busybox";

  inputs = {
    busybox = {
      url = "path:./busybox";
      flake = false;
    };
    kernel = {
      url = "path:./kernel";
      flake = false;
    };
  };

  outputs =
    { self, busybox, kernel }:
    let
      mvm = import ./mvm-lib.nix;
      bb = "${busybox}/busybox";
      rootfs = mvm.mkImage {
        name = "mvm-test-rootfs";
        busybox = bb;
        # The build step: files computed during the build.
        extraCommands = ''
          echo "built by nix" > etc/greeting
          sha256sum etc/greeting | cut -c1-16 > srv/greeting.sha256
        '';
      };
    in
    {
      packages.x86_64-linux = {
        inherit rootfs;
        notATree = derivation {
          name = "mvm-test-not-a-tree";
          system = "x86_64-linux";
          builder = bb;
          args = [
            "sh"
            "-c"
            "echo just a file > $out"
          ];
        };
        withKernel = derivation {
          name = "mvm-test-kernel-and-rootfs";
          system = "x86_64-linux";
          builder = bb;
          args = [
            "sh"
            "-c"
            ''
              ${bb} mkdir -p $out
              ${bb} cp -a ${rootfs} $out/rootfs
              { ${bb} cat ${kernel}/vmlinux; echo mvm-flake-kernel; } > $out/vmlinux
            ''
          ];
        };
      };
    };
}
