//! Content-addressed file storage: a blob's name is the sha256 of its bytes.
//!
//! Writes follow write → fsync → rename → fsync(dir), so a blob that is visible is complete.

use std::path::{Path, PathBuf};

use bytes::Bytes;
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

/// Where model files live. Local disk now; an S3-compatible variant joins here.
#[derive(Debug, Clone)]
pub enum BlobStore {
    Local(LocalBlobStore),
}

#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
    tmp: PathBuf,
}

impl LocalBlobStore {
    pub fn open(data_dir: &Path) -> Result<LocalBlobStore, RegistryError> {
        let root = data_dir.join("blobs").join("sha256");
        let tmp = data_dir.join("tmp");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&tmp)?;
        // Leftovers of uploads that were never acknowledged.
        for entry in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(LocalBlobStore { root, tmp })
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join(sha256)
    }
}

impl BlobStore {
    /// Streams `body` into a temporary file, hashing as it goes; refuses more than `limit` bytes.
    pub async fn stage(&self, mut body: impl AsyncRead + Unpin, limit: u64) -> Result<Staged, RegistryError> {
        let BlobStore::Local(local) = self;
        let path = tempfile::Builder::new().prefix("upload-").tempfile_in(&local.tmp)?.into_temp_path();
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

    /// Makes a staged upload permanent under its hash. The rename replaces a file of the same
    /// name, so a stored copy that went bad is healed by pushing the same bytes again.
    pub async fn commit(&self, staged: Staged) -> Result<(), RegistryError> {
        let BlobStore::Local(local) = self;
        let dest = local.path_of(&staged.sha256);
        let root = local.root.clone();
        tokio::task::spawn_blocking(move || -> Result<(), RegistryError> {
            staged.path.persist(&dest).map_err(|e| RegistryError::Io(e.error))?;
            std::fs::File::open(&root)?.sync_all()?;
            Ok(())
        })
        .await
        .map_err(|e| RegistryError::Io(std::io::Error::other(e)))?
    }

    /// Reads a blob and checks it still hashes to its name.
    pub async fn read(&self, sha256: &str) -> Result<Bytes, RegistryError> {
        let BlobStore::Local(local) = self;
        let data = tokio::fs::read(local.path_of(sha256)).await?;
        let (data, actual) = tokio::task::spawn_blocking(move || {
            let h = hex::encode(Sha256::digest(&data));
            (data, h)
        })
        .await
        .map_err(|e| RegistryError::Io(std::io::Error::other(e)))?;
        if actual != sha256 {
            return Err(RegistryError::Corrupt { sha256: sha256.into() });
        }
        Ok(Bytes::from(data))
    }

    pub async fn remove(&self, sha256: &str) -> Result<(), RegistryError> {
        let BlobStore::Local(local) = self;
        match tokio::fs::remove_file(local.path_of(sha256)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
