# mvm's Nix helpers, for a flake that `mvm image build --flake` builds (docs/images.md).
#
#   mkImage { busybox = "${pkgs.pkgsStatic.busybox}/bin/busybox"; packages = [ pkgs.python3 ]; }
#
# gives a root filesystem tree for an mvm image: /usr/bin with busybox's applets and
# every package's bin/ and sbin/ linked in (/bin and /sbin link to it), /etc/passwd
# and /etc/group with root and the workload user mvm (uid and gid 1000, home /work),
# and whatever `extraCommands` adds. Files linked from packages stay in /nix/store:
# mvm puts the output's whole closure there. It needs no nixpkgs: its build runs on
# the static busybox it is given (a path to the binary), so a flake whose inputs are
# all local paths can use it offline (tests/flakes/rootfs does).
{
  mkImage =
    {
      # A static busybox binary (a path, or a string with its store context).
      busybox,
      name ? "mvm-image",
      system ? "x86_64-linux",
      # Store paths whose bin/ and sbin/ entries are linked into /usr/bin.
      packages ? [ ],
      # Shell run last, in the tree ($out), with busybox's applets on PATH.
      extraCommands ? "",
    }:
    derivation {
      inherit name system;
      builder = busybox;
      args = [
        "sh"
        "-c"
        ''
          set -eu
          tools=$TMPDIR/tools
          ${busybox} mkdir -p $tools
          ${busybox} --install -s $tools
          export PATH=$tools
          mkdir -p $out/usr/bin $out/etc $out/root $out/work $out/tmp $out/srv
          chmod 1777 $out/tmp
          ln -s usr/bin $out/bin
          ln -s usr/bin $out/sbin
          cp ${busybox} $out/usr/bin/busybox
          for applet in $(busybox --list); do
            [ -e $out/usr/bin/$applet ] || ln -s busybox $out/usr/bin/$applet
          done
          for p in ${builtins.concatStringsSep " " (map toString packages)}; do
            for d in bin sbin; do
              [ -d $p/$d ] || continue
              for f in $p/$d/*; do ln -sfn $f $out/usr/bin/$(basename $f); done
            done
          done
          printf 'root:x:0:0:root:/root:/bin/sh\nmvm:x:1000:1000:mvm workload:/work:/bin/sh\n' > $out/etc/passwd
          printf 'root:x:0:\nmvm:x:1000:\n' > $out/etc/group
          cd $out
          ${extraCommands}
        ''
      ];
    };
}
