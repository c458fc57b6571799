#!/usr/bin/env bash
# Build a busybox image from Debian's busybox-static, as a `docker save`
# tarball: `busybox.sh OUT.tar [NAME:TAG]`. No registry, no network.
set -euo pipefail
out=$(realpath -m "$1"); tag=${2:-busybox:latest}
bb=/bin/busybox
[ -x "$bb" ] && "$bb" --list-full >/dev/null 2>&1 || { echo "busybox-static is not installed (apt-get install busybox-static)" >&2; exit 1; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev,var/www,home}
chmod 1777 "$root/tmp"
cp "$bb" "$root/bin/busybox"
for p in $("$bb" --list-full); do
  [ "$p" = bin/busybox ] && continue
  mkdir -p "$root/$(dirname "$p")"
  ln -sf /bin/busybox "$root/$p"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
: >"$root/etc/hosts"; : >"$root/etc/resolv.conf"; : >"$root/etc/hostname"
mkdir -p "$work/img/layer"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$root" -cf "$work/img/layer/layer.tar" .
diff=$(sha256sum "$work/img/layer/layer.tar" | cut -d' ' -f1)
cat >"$work/img/config.json" <<JSON
{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:$diff"]},"history":[{"created_by":"orc deploy/images/busybox.sh"}]}
JSON
cfg=$(sha256sum "$work/img/config.json" | cut -d' ' -f1)
mv "$work/img/config.json" "$work/img/$cfg.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer/layer.tar"]}]\n' "$cfg" "$tag" >"$work/img/manifest.json"
tar --owner=0 --group=0 --numeric-owner -C "$work/img" -cf "$out" manifest.json "$cfg.json" layer
echo "$out: $tag (sha256:$cfg)"
