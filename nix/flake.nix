# mvm for people who have nixpkgs: the guest kernel (nix/kernel/microvm.config on
# tinyconfig, the same fragment scripts/build-kernel uses on Debian's source), a
# default and a python image as root filesystem trees for `mvm image build --flake`,
# and lib.mkImage (nix/lib.nix) for a flake of your own:
#
#   inputs.mvm.url = "github:OWNER/mvm?dir=nix";
#   packages.x86_64-linux.rootfs = mvm.lib.mkImage {
#     busybox = "${pkgs.pkgsStatic.busybox}/bin/busybox";
#     packages = [ pkgs.python3 pkgs.git ];
#   };
#
# then `mvm image build --flake .#rootfs --name mine`. What has been run: lib.mkImage,
# by scripts/check-images (tests/flakes/rootfs, offline, in mvm's Nix builder VM).
# What has not: everything here that needs nixpkgs (the kernel and the two images),
# since nixpkgs and the binary cache are out of reach on the machines mvm is built on;
# the kernel mvm boots is the one scripts/build-kernel builds, whatever this gives.
{
  description = "mvm: guest kernel, images and mkImage for mvm root filesystems";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs =
    { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      lib = import ./lib.nix;
      busybox = "${pkgs.pkgsStatic.busybox}/bin/busybox";
    in
    {
      inherit lib;

      packages.${system} = {
        # The guest kernel: tinyconfig with microvm.config merged on top, ELF vmlinux.
        kernel = pkgs.stdenv.mkDerivation {
          pname = "mvm-guest-kernel";
          inherit (pkgs.linux_6_12) version src;
          nativeBuildInputs = with pkgs; [ bc bison flex perl elfutils openssl ];
          dontConfigure = true;
          buildPhase = ''
            make ARCH=x86_64 tinyconfig
            scripts/kconfig/merge_config.sh -m .config ${./kernel/microvm.config}
            make ARCH=x86_64 olddefconfig
            make ARCH=x86_64 -j$NIX_BUILD_CORES vmlinux
          '';
          installPhase = ''
            mkdir -p $out
            cp vmlinux .config $out/
          '';
        };

        # busybox alone, as the default image has it.
        default = lib.mkImage {
          name = "mvm-default-rootfs";
          inherit busybox;
        };

        # python3 with its standard library, as images/python has it from Debian.
        python = lib.mkImage {
          name = "mvm-python-rootfs";
          inherit busybox;
          packages = [ pkgs.python3 ];
        };
      };
    };
}
