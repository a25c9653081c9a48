# A flake whose only inputs are local (no nixpkgs, no network): a root filesystem
# made by mvm's own lib.mkImage from a static busybox given as a path input, with a
# build step of its own. scripts/check-images copies it with busybox/busybox and
# the repository's nix/lib.nix (as mvm-lib.nix) beside it, and builds it with
# `mvm image build --flake DIR#rootfs --lock`.
{
  description = "mvm test: a root filesystem from a static busybox";

  inputs.busybox = {
    url = "path:./busybox";
    flake = false;
  };

  outputs =
    { self, busybox }:
    let
      mvm = import ./mvm-lib.nix;
    in
    {
      packages.x86_64-linux.rootfs = mvm.mkImage {
        name = "mvm-test-rootfs";
        busybox = "${busybox}/busybox";
        # The build step: files computed during the build.
        extraCommands = ''
          echo "built by nix" > etc/greeting
          sha256sum etc/greeting | cut -c1-16 > srv/greeting.sha256
        '';
      };
    };
}
