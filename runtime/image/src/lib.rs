//! orc-image: a node's OCI image store. It owns content-addressed blobs
//! (configs, manifests), layers unpacked once by diff ID with overlayfs
//! whiteouts and shared between images, and an index of image names. Images
//! come in through `import` (an OCI layout or a `docker save` tarball). It
//! mounts a container's root filesystem as an overlay of an image's layers.
//! It must not depend on the API, the agent or the container runtime.
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

pub mod registry;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Registry(String),
    #[error("image {0} is not present on this node")]
    NotFound(String),
    #[error("digest mismatch for {what}: expected {expected}, got {got}")]
    Digest {
        what: String,
        expected: String,
        got: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// `busybox` → `docker.io/library/busybox:latest`; `reg:5000/a/b@sha256:..`
/// stays as it is. The Kubernetes/Docker normalization of image references.
pub fn normalize(reference: &str) -> String {
    let r = reference.trim();
    let (name, suffix) = match r.find('@') {
        Some(i) => (&r[..i], r[i..].to_string()),
        None => {
            // A tag is a ':' after the last '/'.
            let slash = r.rfind('/').map(|i| i + 1).unwrap_or(0);
            match r[slash..].rfind(':') {
                Some(i) => (&r[..slash + i], r[slash + i..].to_string()),
                None => (r, ":latest".to_string()),
            }
        }
    };
    let first = name.split('/').next().unwrap_or("");
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_registry {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{full}{suffix}")
}

/// One image as the store knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Image {
    /// `sha256:` digest of the image config: the image ID.
    pub id: String,
    /// Normalized references that name it.
    pub names: Vec<String>,
    /// Manifest digests it was known by (for `name@sha256:` references).
    #[serde(default)]
    pub digests: Vec<String>,
    /// Layer diff IDs, bottom first.
    pub layers: Vec<String>,
    /// Unpacked size in bytes.
    pub size: u64,
    /// The layer archives as stored (digest, media type), for pushing.
    #[serde(default)]
    pub layer_blobs: Vec<(String, String)>,
}

/// The parts of an image config a container needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

pub fn run_config(config: &Value) -> RunConfig {
    let c = &config["config"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    };
    RunConfig {
        entrypoint: strings(&c["Entrypoint"]),
        cmd: strings(&c["Cmd"]),
        env: strings(&c["Env"]),
        working_dir: c["WorkingDir"].as_str().unwrap_or("").to_string(),
        user: c["User"].as_str().unwrap_or("").to_string(),
    }
}

/// A node's image store rooted at a directory.
pub struct Store {
    pub(crate) root: PathBuf,
}

#[derive(Default, Serialize, Deserialize)]
struct Index {
    images: BTreeMap<String, Image>,
}

pub(crate) fn hex_of(digest: &str) -> Result<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| Error::Invalid(format!("unsupported digest {digest:?}")))
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

pub(crate) fn digest_of(h: Sha256) -> String {
    format!("sha256:{:x}", h.finalize())
}

/// The layer diff IDs an image config lists, bottom first.
pub(crate) fn diff_ids(config: &Value) -> Vec<String> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

/// A manifest must list one layer per diff ID of its config.
pub(crate) fn same_count(what: &str, layers: usize, diff_ids: usize) -> Result<()> {
    if layers != diff_ids {
        return Err(Error::Invalid(format!(
            "{what}: {layers} layers but {diff_ids} diff_ids"
        )));
    }
    Ok(())
}

/// A path inside an archive, made relative and free of `..`.
fn safe_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// What a layer entry turns into under overlayfs.
#[derive(Debug, PartialEq)]
pub enum Whiteout {
    /// `.wh..wh..opq`: the directory hides everything below it.
    Opaque(PathBuf),
    /// `.wh.NAME`: NAME is deleted.
    Remove(PathBuf),
    None,
}

pub fn whiteout(path: &Path) -> Whiteout {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Whiteout::None;
    };
    let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
    if name == ".wh..wh..opq" {
        Whiteout::Opaque(parent)
    } else if let Some(n) = name.strip_prefix(".wh.") {
        Whiteout::Remove(parent.join(n))
    } else {
        Whiteout::None
    }
}

fn set_opaque(dir: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid("path with NUL".into()))?;
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if r != 0 {
        return Err(io_err(format!("opaque {}", dir.display()))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn make_whiteout(path: &Path) -> Result<()> {
    let _ = fs::remove_file(path);
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .map_err(|e| io_err(format!("whiteout {}", path.display()))(e.into()))
}

/// Unpack one layer tar stream (plain or gzip) into `dir`, turning whiteouts
/// into overlayfs whiteouts. Returns the diff ID (sha256 of the plain tar)
/// and the bytes unpacked.
pub fn unpack_layer(stream: impl Read, dir: &Path) -> Result<(String, u64)> {
    let mut peek = io::BufReader::new(stream);
    let gz = {
        use io::BufRead;
        let head = peek.fill_buf().map_err(io_err("read layer"))?;
        head.starts_with(&[0x1f, 0x8b])
    };
    let plain: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(peek))
    } else {
        Box::new(peek)
    };
    let mut hashing = Hashing {
        inner: plain,
        hash: Sha256::new(),
    };
    fs::create_dir_all(dir).map_err(io_err(format!("mkdir {}", dir.display())))?;
    let mut size = 0u64;
    {
        let mut ar = tar::Archive::new(&mut hashing);
        ar.set_preserve_permissions(true);
        ar.set_preserve_ownerships(true);
        ar.set_unpack_xattrs(true);
        ar.set_overwrite(true);
        for entry in ar.entries().map_err(io_err("layer entries"))? {
            let mut entry = entry.map_err(io_err("layer entry"))?;
            let path = entry.path().map_err(io_err("layer path"))?.into_owned();
            let Some(rel) = safe_relative(&path) else {
                return Err(Error::Invalid(format!(
                    "layer path {} escapes the layer",
                    path.display()
                )));
            };
            match whiteout(&rel) {
                Whiteout::Opaque(d) => {
                    let d = dir.join(d);
                    fs::create_dir_all(&d).map_err(io_err(format!("mkdir {}", d.display())))?;
                    set_opaque(&d)?;
                }
                Whiteout::Remove(p) => {
                    let p = dir.join(p);
                    if let Some(parent) = p.parent() {
                        fs::create_dir_all(parent).map_err(io_err("mkdir"))?;
                    }
                    make_whiteout(&p)?;
                }
                Whiteout::None => {
                    size += entry.header().size().unwrap_or(0);
                    entry
                        .unpack_in(dir)
                        .map_err(io_err(format!("unpack {}", rel.display())))?;
                }
            }
        }
    }
    // Drain the padding so the digest covers the whole stream.
    io::copy(&mut hashing, &mut io::sink()).map_err(io_err("read layer"))?;
    Ok((digest_of(hashing.hash), size))
}

/// A file read out of an archive: by path.
type Files = BTreeMap<String, Vec<u8>>;

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("images.json")
    }

    fn load(&self) -> Index {
        fs::read(self.index_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, idx: &Index) -> Result<()> {
        fs::create_dir_all(&self.root).map_err(io_err("mkdir image store"))?;
        let tmp = self.root.join("images.json.tmp");
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(idx).expect("index serializes"),
        )
        .map_err(io_err("write image index"))?;
        fs::rename(&tmp, self.index_path()).map_err(io_err("write image index"))
    }

    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf> {
        Ok(self.root.join("layers").join(hex_of(diff_id)?))
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    pub fn has_layer(&self, diff_id: &str) -> bool {
        self.layer_dir(diff_id)
            .map(|d| d.join(".complete").exists())
            .unwrap_or(false)
    }

    /// Store a blob under its digest after checking it.
    pub fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let got = digest_of(Sha256::new_with_prefix(bytes));
        if got != digest {
            return Err(Error::Digest {
                what: "blob".into(),
                expected: digest.into(),
                got,
            });
        }
        let p = self.blob_path(digest)?;
        fs::create_dir_all(p.parent().unwrap()).map_err(io_err("mkdir blobs"))?;
        fs::write(&p, bytes).map_err(io_err("write blob"))
    }

    pub fn blob(&self, digest: &str) -> Result<Vec<u8>> {
        fs::read(self.blob_path(digest)?).map_err(io_err(format!("blob {digest}")))
    }

    /// The image config of an image.
    pub fn config(&self, img: &Image) -> Result<Value> {
        serde_json::from_slice(&self.blob(&img.id)?)
            .map_err(|e| Error::Invalid(format!("image config {}: {e}", img.id)))
    }

    /// Unpack a layer stream as `diff_id` (checked) unless it is present.
    pub fn add_layer(&self, diff_id: &str, stream: impl Read) -> Result<u64> {
        let dir = self.layer_dir(diff_id)?;
        if self.has_layer(diff_id) {
            return Ok(0);
        }
        let tmp = dir.with_extension("tmp");
        let _ = fs::remove_dir_all(&tmp);
        let (got, size) = unpack_layer(stream, &tmp)?;
        if got != diff_id {
            let _ = fs::remove_dir_all(&tmp);
            return Err(Error::Digest {
                what: "layer".into(),
                expected: diff_id.into(),
                got,
            });
        }
        fs::write(tmp.join(".complete"), b"").map_err(io_err("mark layer"))?;
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&tmp, &dir).map_err(io_err("store layer"))?;
        Ok(size)
    }

    /// Record an image whose config blob and layers are stored.
    pub fn record(
        &self,
        config_digest: &str,
        names: &[String],
        manifest_digest: Option<&str>,
    ) -> Result<Image> {
        let config: Value = serde_json::from_slice(&self.blob(config_digest)?)
            .map_err(|e| Error::Invalid(format!("image config: {e}")))?;
        let layers = diff_ids(&config);
        for l in &layers {
            if !self.has_layer(l) {
                return Err(Error::Invalid(format!("layer {l} is missing")));
            }
        }
        let mut idx = self.load();
        // A name moves to the newest image that carries it.
        for img in idx.images.values_mut() {
            img.names.retain(|n| !names.contains(n));
        }
        let size = layers
            .iter()
            .filter_map(|l| self.layer_dir(l).ok())
            .map(|d| dir_size(&d))
            .sum();
        let img = idx
            .images
            .entry(config_digest.to_string())
            .or_insert_with(|| Image {
                id: config_digest.to_string(),
                names: vec![],
                digests: vec![],
                layers: layers.clone(),
                size,
                layer_blobs: vec![],
            });
        for n in names {
            if !img.names.contains(n) {
                img.names.push(n.clone());
            }
        }
        if let Some(d) = manifest_digest {
            if !img.digests.iter().any(|x| x == d) {
                img.digests.push(d.to_string());
            }
        }
        let img = img.clone();
        self.save(&idx)?;
        Ok(img)
    }

    /// Replace an image's record.
    pub fn update(&self, img: &Image) -> Result<()> {
        let mut idx = self.load();
        idx.images.insert(img.id.clone(), img.clone());
        self.save(&idx)
    }

    pub fn list(&self) -> Vec<Image> {
        self.load().images.into_values().collect()
    }

    /// The image a reference names: by name, `name@digest`, or image ID.
    pub fn resolve(&self, reference: &str) -> Option<Image> {
        let norm = normalize(reference);
        let images = self.load().images;
        if let Some((_, digest)) = norm.split_once('@') {
            return images
                .into_values()
                .find(|i| i.digests.iter().any(|d| d == digest) || i.id == digest);
        }
        images
            .into_values()
            .find(|i| i.names.contains(&norm) || i.id == reference)
    }

    /// Run `f` holding the store's lock (an flock on `ROOT/.lock`), so pulls
    /// and imports, of this process or another, never interleave; like the
    /// kubelet's default, pulls are serialized.
    pub(crate) fn locked<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        use std::os::fd::AsRawFd;
        fs::create_dir_all(&self.root).map_err(io_err("mkdir image store"))?;
        let lock = fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(".lock"))
            .map_err(io_err("image store lock"))?;
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err("image store lock")(io::Error::last_os_error()));
        }
        // Released when `lock` closes.
        f()
    }

    /// Import an OCI image layout or a `docker save` tarball (plain or
    /// gzip). Returns the images it held.
    pub fn import(&self, file: &Path) -> Result<Vec<Image>> {
        self.locked(|| self.import_unlocked(file))
    }

    fn import_unlocked(&self, file: &Path) -> Result<Vec<Image>> {
        let files = read_archive(file)?;
        if files.contains_key("index.json") && files.contains_key("oci-layout") {
            self.import_oci(&files)
        } else if files.contains_key("manifest.json") {
            self.import_docker(&files)
        } else {
            Err(Error::Invalid(format!(
                "{}: neither an OCI layout (index.json, oci-layout) nor a docker-save archive (manifest.json)",
                file.display()
            )))
        }
    }

    fn import_docker(&self, files: &Files) -> Result<Vec<Image>> {
        let manifest: Value = serde_json::from_slice(&files["manifest.json"])
            .map_err(|e| Error::Invalid(format!("manifest.json: {e}")))?;
        let mut out = vec![];
        for m in manifest.as_array().into_iter().flatten() {
            let cfg_name = m["Config"]
                .as_str()
                .ok_or_else(|| Error::Invalid("manifest.json: entry without Config".into()))?;
            let cfg = files.get(cfg_name).ok_or_else(|| {
                Error::Invalid(format!(
                    "manifest.json names {cfg_name}, which the archive lacks"
                ))
            })?;
            let config_digest = digest_of(Sha256::new_with_prefix(cfg));
            self.put_blob(&config_digest, cfg)?;
            let config: Value = serde_json::from_slice(cfg)
                .map_err(|e| Error::Invalid(format!("{cfg_name}: {e}")))?;
            let diff_ids = diff_ids(&config);
            let layers: Vec<&str> = m["Layers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            same_count(cfg_name, layers.len(), diff_ids.len())?;
            for (l, d) in layers.iter().zip(&diff_ids) {
                let bytes = files
                    .get(*l)
                    .ok_or_else(|| Error::Invalid(format!("layer {l} missing from the archive")))?;
                self.add_layer(d, &bytes[..])?;
                // The plain tar is the layer archive (its digest is the diff ID).
                self.put_blob(d, bytes)?;
            }
            let names: Vec<String> = m["RepoTags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(normalize)
                .collect();
            let mut img = self.record(&config_digest, &names, None)?;
            img.layer_blobs = diff_ids
                .iter()
                .map(|d| (d.to_string(), registry::OCI_LAYER.to_string()))
                .collect();
            self.update(&img)?;
            out.push(img);
        }
        Ok(out)
    }

    fn import_oci(&self, files: &Files) -> Result<Vec<Image>> {
        let blob = |d: &str| -> Result<&Vec<u8>> {
            files
                .get(&format!("blobs/sha256/{}", hex_of(d)?))
                .ok_or_else(|| Error::Invalid(format!("blob {d} missing from the layout")))
        };
        let index: Value = serde_json::from_slice(&files["index.json"])
            .map_err(|e| Error::Invalid(format!("index.json: {e}")))?;
        let mut out = vec![];
        let mut todo: Vec<(Value, Option<String>)> = index["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|m| (m, None))
            .collect();
        while let Some((desc, name)) = todo.pop() {
            let digest = desc["digest"].as_str().unwrap_or("").to_string();
            let bytes = blob(&digest)?;
            self.put_blob(&digest, bytes)?;
            let doc: Value = serde_json::from_slice(bytes)
                .map_err(|e| Error::Invalid(format!("{digest}: {e}")))?;
            let name = desc["annotations"]["io.containerd.image.name"]
                .as_str()
                .or(desc["annotations"]["org.opencontainers.image.ref.name"].as_str())
                .map(|n| {
                    if n.contains(':') || n.contains('/') {
                        normalize(n)
                    } else {
                        normalize(&format!("localhost/image:{n}"))
                    }
                })
                .or(name);
            if doc["manifests"].is_array() {
                // An index: take the linux/amd64 manifest (or the only one).
                for m in doc["manifests"].as_array().unwrap() {
                    let p = &m["platform"];
                    if p.is_null() || (p["os"] == "linux" && p["architecture"] == "amd64") {
                        todo.push((m.clone(), name.clone()));
                    }
                }
                continue;
            }
            let cfg_digest = doc["config"]["digest"]
                .as_str()
                .ok_or_else(|| Error::Invalid(format!("manifest {digest} has no config")))?
                .to_string();
            let cfg = blob(&cfg_digest)?;
            self.put_blob(&cfg_digest, cfg)?;
            let config: Value = serde_json::from_slice(cfg)
                .map_err(|e| Error::Invalid(format!("config {cfg_digest}: {e}")))?;
            let diff_ids = diff_ids(&config);
            let layers: Vec<String> = doc["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l["digest"].as_str().map(String::from))
                .collect();
            same_count(&format!("manifest {digest}"), layers.len(), diff_ids.len())?;
            for (l, d) in layers.iter().zip(&diff_ids) {
                let bytes = blob(l)?;
                let got = digest_of(Sha256::new_with_prefix(bytes));
                if &got != l {
                    return Err(Error::Digest {
                        what: "layer blob".into(),
                        expected: l.clone(),
                        got,
                    });
                }
                self.add_layer(d, &bytes[..])?;
                self.put_blob(l, bytes)?;
            }
            let names: Vec<String> = name.into_iter().collect();
            let mut img = self.record(&cfg_digest, &names, Some(&digest))?;
            img.layer_blobs = doc["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| {
                    (
                        l["digest"].as_str().unwrap_or("").to_string(),
                        l["mediaType"]
                            .as_str()
                            .unwrap_or(registry::OCI_LAYER)
                            .to_string(),
                    )
                })
                .collect();
            self.update(&img)?;
            out.push(img);
        }
        Ok(out)
    }

    /// The overlay mount options for a root filesystem of `img`, with the
    /// container's writable layer in `upper` and overlay's `work` (both
    /// made here).
    pub fn overlay_options(&self, img: &Image, upper: &Path, work: &Path) -> Result<String> {
        for d in [upper, work] {
            fs::create_dir_all(d).map_err(io_err(format!("mkdir {}", d.display())))?;
        }
        // overlayfs wants the top layer first.
        let lower: Vec<String> = img
            .layers
            .iter()
            .rev()
            .map(|l| self.layer_dir(l).map(|d| d.display().to_string()))
            .collect::<Result<_>>()?;
        Ok(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        ))
    }
}

/// A `docker save` archive of a one-layer image holding a static busybox
/// (`busybox`, its applets as links from `busybox --list-full`, /etc/passwd
/// and group), tagged `tag`. For machines without a registry: `orc image
/// busybox`, `orc up`'s demo image and the tests use it.
pub fn busybox_archive(busybox: &Path, tag: &str) -> Result<Vec<u8>> {
    let bin = fs::read(busybox).map_err(io_err(format!(
        "read {} (a static busybox: apt-get install busybox-static)",
        busybox.display()
    )))?;
    let list = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(io_err(format!("{} --list-full", busybox.display())))?;
    let applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(String::from)
        .collect();
    let mut layer = tar::Builder::new(Vec::new());
    let mut add = |path: &str,
                   kind: tar::EntryType,
                   mode: u32,
                   data: &[u8],
                   link: Option<&str>|
     -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).map_err(io_err("link"))?;
        }
        h.set_cksum();
        layer
            .append_data(&mut h, path, data)
            .map_err(io_err("layer"))
    };
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "home", "var", "var/www",
        "proc", "sys", "dev",
    ] {
        add(d, tar::EntryType::Directory, 0o755, &[], None)?;
    }
    add("tmp", tar::EntryType::Directory, 0o1777, &[], None)?;
    add("bin/busybox", tar::EntryType::Regular, 0o755, &bin, None)?;
    for a in applets {
        let a = a.trim().trim_start_matches('/');
        if a.is_empty() || a == "bin/busybox" || !a.contains('/') {
            continue;
        }
        add(a, tar::EntryType::Symlink, 0o777, &[], Some("/bin/busybox"))?;
    }
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        None,
    )?;
    add(
        "etc/group",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n",
        None,
    )?;
    for f in ["etc/hosts", "etc/resolv.conf", "etc/hostname"] {
        add(f, tar::EntryType::Regular, 0o644, b"", None)?;
    }
    let layer = layer.into_inner().map_err(io_err("layer"))?;
    let diff = digest_of(Sha256::new_with_prefix(&layer));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff]}}))
    .expect("config serializes");
    let cfg_name = format!(
        "{}.json",
        hex_of(&digest_of(Sha256::new_with_prefix(&config)))?
    );
    let manifest = serde_json::to_vec(&serde_json::json!([{"Config": cfg_name, "RepoTags": [tag], "Layers": ["layer/layer.tar"]}]))
        .expect("manifest serializes");
    let mut out = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest),
        (cfg_name.as_str(), &config),
        ("layer/layer.tar", &layer),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.append_data(&mut h, name, &data[..])
            .map_err(io_err("archive"))?;
    }
    out.into_inner().map_err(io_err("archive"))
}

/// Standard base64 (padding optional; the URL-safe alphabet is accepted too).
pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = vec![];
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

pub fn base64_encode(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &x)| acc | (x as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn dir_size(d: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![d.to_path_buf()];
    while let Some(p) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&p) {
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_dir() {
                        stack.push(e.path());
                    } else {
                        total += m.len();
                    }
                }
            }
        }
    }
    total
}

/// Every regular file of a tar archive (plain or gzip), by normalized path.
fn read_archive(file: &Path) -> Result<Files> {
    let f = fs::File::open(file).map_err(io_err(format!("open {}", file.display())))?;
    let mut peek = io::BufReader::new(f);
    let gz = {
        use io::BufRead;
        peek.fill_buf()
            .map_err(io_err("read archive"))?
            .starts_with(&[0x1f, 0x8b])
    };
    let r: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(peek))
    } else {
        Box::new(peek)
    };
    let mut ar = tar::Archive::new(r);
    let mut out = Files::new();
    for e in ar
        .entries()
        .map_err(io_err(format!("{} is not a tar archive", file.display())))?
    {
        let mut e = e.map_err(io_err("archive entry"))?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let p = e.path().map_err(io_err("archive path"))?;
        let Some(rel) = safe_relative(&p) else {
            continue;
        };
        let mut buf = Vec::new();
        e.read_to_end(&mut buf).map_err(io_err("archive read"))?;
        out.insert(rel.to_string_lossy().into_owned(), buf);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalized() {
        assert_eq!(normalize("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalize("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(normalize("me/app"), "docker.io/me/app:latest");
        assert_eq!(
            normalize("127.0.0.1:5000/busybox"),
            "127.0.0.1:5000/busybox:latest"
        );
        assert_eq!(normalize("localhost/x:1"), "localhost/x:1");
        let d = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
        assert_eq!(normalize(&format!("reg.io/a@{d}")), format!("reg.io/a@{d}"));
    }

    #[test]
    fn base64_round_trips() {
        for s in [&b""[..], b"a", b"ab", b"abc", b"user:pass"] {
            assert_eq!(base64_decode(&base64_encode(s)), s);
        }
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
    }

    #[test]
    fn whiteouts_are_recognized() {
        assert_eq!(
            whiteout(Path::new("etc/.wh.passwd")),
            Whiteout::Remove("etc/passwd".into())
        );
        assert_eq!(
            whiteout(Path::new("var/.wh..wh..opq")),
            Whiteout::Opaque("var".into())
        );
        assert_eq!(whiteout(Path::new("bin/sh")), Whiteout::None);
    }

    #[test]
    fn paths_cannot_escape() {
        assert_eq!(safe_relative(Path::new("./a/b")), Some("a/b".into()));
        assert_eq!(safe_relative(Path::new("/a")), Some("a".into()));
        assert_eq!(safe_relative(Path::new("a/../../b")), None);
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, p, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn docker_save_archives_import_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_of(&[("bin/hello", b"#!/bin/sh\necho hi\n")]);
        let diff = digest_of(Sha256::new_with_prefix(&layer));
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/hello"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff]}}))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": "config.json", "RepoTags": ["hello:1"], "Layers": ["l/layer.tar"]}]))
        .unwrap();
        let archive = tar_of(&[
            ("manifest.json", &manifest),
            ("config.json", &config),
            ("l/layer.tar", &layer),
        ]);
        let file = dir.path().join("img.tar");
        fs::write(&file, archive).unwrap();
        let store = Store::new(dir.path().join("store"));
        let imgs = store.import(&file).unwrap();
        assert_eq!(imgs.len(), 1);
        let img = store.resolve("hello:1").expect("resolves by tag");
        assert_eq!(img.layers, vec![diff.clone()]);
        assert!(store.layer_dir(&diff).unwrap().join("bin/hello").exists());
        assert_eq!(
            run_config(&store.config(&img).unwrap()).cmd,
            vec!["/bin/hello"]
        );
        assert!(store.resolve("hello:2").is_none());
        // A layer whose content does not match its diff ID is refused.
        let bad_config = serde_json::to_vec(&serde_json::json!({
            "rootfs": {"type": "layers", "diff_ids": ["sha256:1111111111111111111111111111111111111111111111111111111111111111"]}})).unwrap();
        let archive = tar_of(&[
            ("manifest.json", &manifest),
            ("config.json", &bad_config),
            ("l/layer.tar", &layer),
        ]);
        fs::write(&file, archive).unwrap();
        assert!(matches!(store.import(&file), Err(Error::Digest { .. })));
    }
}
