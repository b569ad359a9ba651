//! Content-addressed file storage: a blob's name is the sha256 of its bytes.
//!
//! Local disk (the default) or an S3-compatible object store. Local writes follow write → fsync →
//! rename → fsync(dir), so a blob that is visible is complete; an object store makes an object
//! visible only once its upload completed. With an object store, `data_dir/blobs/sha256/` is a
//! cache of the objects, checked against their hash on every read (a bad copy is fetched again).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::RegistryError;

/// An upload written to a temporary file, hashed and fsynced, not yet visible in the registry.
#[derive(Debug)]
pub struct Staged {
    path: tempfile::TempPath,
    pub sha256: String,
    pub size: u64,
    /// The first bytes, for format detection.
    pub head: Vec<u8>,
}

impl Staged {
    pub async fn read(&self) -> Result<Bytes, RegistryError> {
        Ok(Bytes::from(tokio::fs::read(&self.path).await?))
    }
}

/// Where model files live: `data_dir/blobs/sha256/<hash>` (the files themselves, or with an
/// object store the cache of `<prefix>/blobs/sha256/<hash>` objects) and `data_dir/tmp` (uploads
/// being staged).
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    tmp: PathBuf,
    remote: Option<Remote>,
}

#[derive(Debug, Clone)]
struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: object_store::path::Path,
    /// `s3://bucket/prefix`, for messages.
    url: String,
}

impl BlobStore {
    /// Local files only.
    pub fn local(data_dir: &Path) -> Result<BlobStore, RegistryError> {
        let root = data_dir.join("blobs").join("sha256");
        let tmp = data_dir.join("tmp");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&tmp)?;
        // Leftovers of uploads that were never acknowledged.
        for entry in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(BlobStore { root, tmp, remote: None })
    }

    /// Files in an S3-compatible store at `url` (`s3://bucket/optional/prefix`), cached in
    /// `data_dir`. `options` are object_store's S3 keys (`endpoint`, `region`, `allow_http`,
    /// `access_key_id`, …); the `AWS_*` environment variables fill in what they leave out.
    pub fn s3(data_dir: &Path, url: &str, options: &BTreeMap<String, String>) -> Result<BlobStore, RegistryError> {
        use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
        let invalid = |why: String| RegistryError::Config(format!("storage {url:?}: {why}"));
        let rest = url.strip_prefix("s3://").ok_or_else(|| invalid("use s3://bucket/prefix".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket".into()));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (key, value) in options {
            let key: AmazonS3ConfigKey = key.parse().map_err(|_| invalid(format!("unknown storage option {key:?}")))?;
            builder = builder.with_config(key, value);
        }
        let store = builder.build().map_err(|e| invalid(e.to_string()))?;
        let prefix = object_store::path::Path::parse(prefix.trim_matches('/'))
            .map_err(|e| invalid(format!("bad prefix: {e}")))?
            .join("blobs")
            .join("sha256");
        let mut blobs = BlobStore::local(data_dir)?;
        blobs.remote = Some(Remote { store: Arc::new(store), prefix, url: url.into() });
        Ok(blobs)
    }

    /// The object store's `s3://bucket/prefix`, when model files live in one.
    pub fn remote_url(&self) -> Option<&str> {
        self.remote.as_ref().map(|r| r.url.as_str())
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join(sha256)
    }

    /// Streams `body` into a temporary file, hashing as it goes; refuses more than `limit` bytes.
    pub async fn stage(&self, mut body: impl AsyncRead + Unpin, limit: u64) -> Result<Staged, RegistryError> {
        let path = tempfile::Builder::new().prefix("upload-").tempfile_in(&self.tmp)?.into_temp_path();
        let mut file = tokio::fs::File::create(&path).await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut head = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = body.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > limit {
                return Err(RegistryError::TooLarge { limit });
            }
            if head.len() < 512 {
                head.extend_from_slice(&buf[..n.min(512 - head.len())]);
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).await?;
        }
        file.sync_all().await?;
        Ok(Staged { path, sha256: hex::encode(hasher.finalize()), size, head })
    }

    /// Makes a staged upload permanent under its hash: uploaded to the object store (when there
    /// is one; done when the upload completed), then renamed into the local directory. The
    /// rename replaces a file of the same name, so a stored copy that went bad is healed by
    /// pushing the same bytes again.
    pub async fn commit(&self, staged: Staged) -> Result<(), RegistryError> {
        if let Some(remote) = &self.remote {
            remote.upload(&staged.path, &staged.sha256).await?;
        }
        let dest = self.path_of(&staged.sha256);
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || -> Result<(), RegistryError> {
            staged.path.persist(&dest).map_err(|e| RegistryError::Io(e.error))?;
            std::fs::File::open(&root)?.sync_all()?;
            Ok(())
        })
        .await
        .map_err(|e| RegistryError::Io(std::io::Error::other(e)))?
    }

    /// Reads a blob and checks it still hashes to its name. With an object store, a missing or
    /// bad local copy is fetched again (and checked) before the blob counts as corrupt.
    pub async fn read(&self, sha256: &str) -> Result<Bytes, RegistryError> {
        let local = match tokio::fs::read(self.path_of(sha256)).await {
            Ok(data) => Some(data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.remote.is_some() => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(data) = local {
            let data = Bytes::from(data);
            if hash_of(data.clone()).await? == sha256 {
                return Ok(data);
            }
            if self.remote.is_none() {
                return Err(RegistryError::Corrupt { sha256: sha256.into() });
            }
            tracing::warn!(sha256, "the cached copy of a model file is corrupt: fetching it again");
        }
        let remote = self.remote.as_ref().expect("checked above");
        let data = remote.download(sha256).await?;
        if hash_of(data.clone()).await? != sha256 {
            return Err(RegistryError::Corrupt { sha256: sha256.into() });
        }
        self.cache(sha256, &data).await?;
        Ok(data)
    }

    /// Keeps a verified copy of a fetched blob locally (temporary file, then rename).
    async fn cache(&self, sha256: &str, data: &Bytes) -> Result<(), RegistryError> {
        let tmp = tempfile::Builder::new().prefix("fetch-").tempfile_in(&self.tmp)?.into_temp_path();
        tokio::fs::write(&tmp, data).await?;
        let dest = self.path_of(sha256);
        tokio::task::spawn_blocking(move || tmp.persist(dest).map_err(|e| RegistryError::Io(e.error)))
            .await
            .map_err(|e| RegistryError::Io(std::io::Error::other(e)))?
    }

    pub async fn remove(&self, sha256: &str) -> Result<(), RegistryError> {
        if let Some(remote) = &self.remote {
            remote.delete(sha256).await?;
        }
        match tokio::fs::remove_file(self.path_of(sha256)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Replaces the stored bytes of a blob (both copies), for tests of corruption handling.
    pub(crate) async fn tamper(&self, sha256: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        if let Some(remote) = &self.remote {
            let path = remote.object(sha256);
            remote.store.put(&path, Bytes::copy_from_slice(bytes).into()).await.map_err(|e| remote.error(e))?;
        }
        tokio::fs::write(self.path_of(sha256), bytes).await?;
        Ok(())
    }
}

impl Remote {
    fn object(&self, sha256: &str) -> object_store::path::Path {
        self.prefix.clone().join(sha256)
    }

    fn error(&self, e: object_store::Error) -> RegistryError {
        RegistryError::Storage(format!("{}: {e}", self.url))
    }

    /// Uploads a file (multipart above a few MiB; the object appears only when complete).
    async fn upload(&self, file: &Path, sha256: &str) -> Result<(), RegistryError> {
        let path = self.object(sha256);
        let mut writer = object_store::buffered::BufWriter::new(self.store.clone(), path);
        let mut reader = tokio::fs::File::open(file).await?;
        let copied = tokio::io::copy(&mut reader, &mut writer).await;
        if let Err(e) = copied {
            let _ = writer.abort().await;
            return Err(RegistryError::Storage(format!("{}: uploading {sha256}: {e}", self.url)));
        }
        writer.shutdown().await.map_err(|e| RegistryError::Storage(format!("{}: uploading {sha256}: {e}", self.url)))
    }

    async fn download(&self, sha256: &str) -> Result<Bytes, RegistryError> {
        let path = self.object(sha256);
        match self.store.get(&path).await {
            Ok(got) => got.bytes().await.map_err(|e| self.error(e)),
            Err(object_store::Error::NotFound { .. }) => Err(RegistryError::Storage(format!(
                "{}: model file {sha256} is missing from the object store",
                self.url
            ))),
            Err(e) => Err(self.error(e)),
        }
    }

    async fn delete(&self, sha256: &str) -> Result<(), RegistryError> {
        match self.store.delete(&self.object(sha256)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }
}

async fn hash_of(data: Bytes) -> Result<String, RegistryError> {
    tokio::task::spawn_blocking(move || hex::encode(Sha256::digest(&data)))
        .await
        .map_err(|e| RegistryError::Io(std::io::Error::other(e)))
}
