# A flake whose only input is a local path (no nixpkgs, no network): a root
# filesystem made from a static busybox, with a build step that runs in Nix's
# build. scripts/check-images copies it with busybox/busybox beside it, and
# builds it with `mvm image build --flake DIR#rootfs --lock`.
{
  description = "mvm test: a root filesystem from a static busybox";

  inputs.busybox = {
    url = "path:./busybox";
    flake = false;
  };

  outputs = { self, busybox }: {
    packages.x86_64-linux.rootfs = derivation {
      name = "mvm-test-rootfs";
      system = "x86_64-linux";
      builder = "${busybox}/busybox";
      args = [
        "sh"
        "-c"
        ''
          set -eu
          bb=${busybox}/busybox
          $bb mkdir -p $out/bin $out/etc $out/srv
          $bb cp $bb $out/bin/busybox
          for applet in sh ls cat echo id sha256sum; do
            $bb ln -s busybox $out/bin/$applet
          done
          echo "root:x:0:0:root:/root:/bin/sh" > $out/etc/passwd
          echo "built by nix" > $out/etc/greeting
          # The build step: a file computed during the build.
          $bb sha256sum $out/etc/greeting | $bb cut -c1-16 > $out/srv/greeting.sha256
        ''
      ];
    };
  };
}
