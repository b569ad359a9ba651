//! What an upload is, and how a stored version becomes the files a loader reads.

use std::collections::BTreeMap;
use std::io::Read;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::RegistryError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One `.onnx` file.
    Onnx,
    /// One `.safetensors` file whose metadata carries its architecture config.
    Safetensors,
    /// A tar of a model directory (`model.onnx`, or `model.safetensors` + `config.json`, …).
    Tar,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Onnx => "onnx",
            Format::Safetensors => "safetensors",
            Format::Tar => "tar",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        [Format::Onnx, Format::Safetensors, Format::Tar].into_iter().find(|f| f.as_str() == s)
    }

    /// Recognises an upload by its first bytes: tar by the `ustar` magic, safetensors by its
    /// length-prefixed JSON header, anything else is taken for ONNX (a protobuf has no magic;
    /// loading it is the real check).
    pub fn detect(head: &[u8]) -> Format {
        if head.len() >= 262 && &head[257..262] == b"ustar" {
            return Format::Tar;
        }
        if head.len() >= 9 {
            let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            if n > 1 && n < 100_000_000 && head[8] == b'{' {
                return Format::Safetensors;
            }
        }
        Format::Onnx
    }
}

/// Bounds on what a tar may expand to.
#[derive(Clone, Copy, Debug)]
pub struct ArtifactLimits {
    pub max_entries: usize,
    pub max_total_bytes: u64,
}

impl Default for ArtifactLimits {
    fn default() -> Self {
        ArtifactLimits { max_entries: 64, max_total_bytes: 8 << 30 }
    }
}

/// The files of a stored version by name: a single file gets its conventional name
/// (`model.onnx`, `model.safetensors`); a tar its regular entries by relative path with `/`
/// separators, less the one directory every entry shares, if any (`m/model.safetensors` →
/// `model.safetensors`, `m/1_Pooling/config.json` → `1_Pooling/config.json`), so that a model
/// directory can be tarred as it is, from inside or from its parent.
pub fn unpack(format: Format, blob: Bytes, limits: ArtifactLimits) -> Result<BTreeMap<String, Bytes>, RegistryError> {
    let mut files = BTreeMap::new();
    match format {
        Format::Onnx => {
            files.insert("model.onnx".to_string(), blob);
        }
        Format::Safetensors => {
            files.insert("model.safetensors".to_string(), blob);
        }
        Format::Tar => {
            let bad = |m: String| RegistryError::InvalidUpload(m);
            let mut archive = tar::Archive::new(&blob[..]);
            let mut total = 0u64;
            let mut entries: Vec<(Vec<String>, Bytes)> = Vec::new();
            for entry in archive.entries().map_err(|e| bad(format!("not a readable tar: {e}")))? {
                let mut entry = entry.map_err(|e| bad(format!("corrupt tar entry: {e}")))?;
                let kind = entry.header().entry_type();
                if kind.is_dir() || kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
                    continue;
                }
                if !kind.is_file() {
                    return Err(bad(format!("tar entry of type {kind:?} is not allowed (only regular files)")));
                }
                let path = entry.path().map_err(|e| bad(format!("tar entry path: {e}")))?.into_owned();
                let mut parts = Vec::new();
                for c in path.components() {
                    match c {
                        std::path::Component::Normal(p) => parts.push(
                            p.to_str()
                                .ok_or_else(|| bad(format!("tar entry {} has no usable name", path.display())))?
                                .to_string(),
                        ),
                        std::path::Component::CurDir => {}
                        _ => return Err(bad(format!("tar entry {} escapes the model directory", path.display()))),
                    }
                }
                if parts.last().is_none_or(|n| n.starts_with("._")) {
                    continue; // macOS resource forks
                }
                let size = entry.header().size().map_err(|e| bad(format!("tar entry size: {e}")))?;
                total = total.saturating_add(size);
                if entries.len() >= limits.max_entries || total > limits.max_total_bytes {
                    return Err(bad(format!(
                        "tar expands beyond the limits ({} entries, {} bytes)",
                        limits.max_entries, limits.max_total_bytes
                    )));
                }
                // The header's size is a claim: never reserve more than the archive could hold.
                let mut data = Vec::with_capacity(size.min(blob.len() as u64) as usize);
                entry.read_to_end(&mut data).map_err(|e| bad(format!("tar entry {}: {e}", path.display())))?;
                entries.push((parts, Bytes::from(data)));
            }
            if entries.is_empty() {
                return Err(bad("tar holds no files".into()));
            }
            let first = &entries[0].0[0];
            let shared_dir = entries.iter().all(|(p, _)| p.len() > 1 && &p[0] == first);
            for (parts, data) in entries {
                let name = parts[usize::from(shared_dir)..].join("/");
                if files.insert(name.clone(), data).is_some() {
                    return Err(bad(format!("tar holds two files named {name}")));
                }
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn detects_formats() {
        let tar = tar_of(&[("model/config.json", b"{}")]);
        assert_eq!(Format::detect(&tar), Format::Tar);
        let mut st = 10u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{\"a\":1}   ");
        assert_eq!(Format::detect(&st), Format::Safetensors);
        assert_eq!(Format::detect(&[0x08, 0x07, 0x12]), Format::Onnx);
    }

    #[test]
    fn unpacks_tar_by_relative_path() {
        let names = |entries: &[(&str, &[u8])]| {
            let files = unpack(Format::Tar, Bytes::from(tar_of(entries)), ArtifactLimits::default()).unwrap();
            files.into_keys().collect::<Vec<_>>()
        };
        // One shared directory is dropped, whatever its name; deeper directories stay.
        let st: &[(&str, &[u8])] =
            &[("m/model.safetensors", b"w"), ("m/config.json", b"{}"), ("m/1_Pooling/config.json", b"{}")];
        assert_eq!(names(st), vec!["1_Pooling/config.json", "config.json", "model.safetensors"]);
        assert_eq!(names(&[("./m/model.onnx", b"x")]), vec!["model.onnx"]);
        // Tarred from inside the directory: nothing is shared, nothing is dropped.
        assert_eq!(names(&[("model.onnx", b"x"), ("extra/notes.txt", b"y")]), vec!["extra/notes.txt", "model.onnx"]);
        assert_eq!(names(&[("a/model.onnx", b"x"), ("b/model.onnx", b"y")]), vec!["a/model.onnx", "b/model.onnx"]);
    }

    #[test]
    fn refuses_duplicate_names() {
        let err = unpack(Format::Tar, Bytes::from(tar_of(&[("m/a", b"1"), ("m/a", b"2")])), ArtifactLimits::default())
            .unwrap_err();
        assert!(err.to_string().contains("two files named a"), "{err}");
    }

    #[test]
    fn refuses_too_many_entries() {
        let tar = tar_of(&[("a", b"1"), ("b", b"2"), ("c", b"3")]);
        let limits = ArtifactLimits { max_entries: 2, max_total_bytes: 100 };
        assert!(unpack(Format::Tar, Bytes::from(tar.clone()), limits).is_err());
        let limits = ArtifactLimits { max_entries: 10, max_total_bytes: 2 };
        assert!(unpack(Format::Tar, Bytes::from(tar), limits).is_err());
    }

    #[test]
    fn a_size_claimed_beyond_the_archive_reserves_no_memory_for_it() {
        let mut h = tar::Header::new_gnu();
        h.set_path("model.onnx").unwrap();
        h.set_size(1 << 40); // 1 TiB claimed; the archive holds 512 bytes of it
        h.set_cksum();
        let mut blob = h.as_bytes().to_vec();
        blob.extend_from_slice(&[0u8; 512]);
        let limits = ArtifactLimits { max_entries: 8, max_total_bytes: u64::MAX };
        assert!(unpack(Format::Tar, Bytes::from(blob), limits).is_err());
    }

    #[test]
    fn refuses_path_traversal() {
        // tar::Builder refuses to write `..`, so forge the header by hand.
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../evil.x");
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend_from_slice(b"x");
        data.resize(data.len() + 511 + 1024, 0);
        let err = unpack(Format::Tar, Bytes::from(data), ArtifactLimits::default()).unwrap_err();
        assert!(err.to_string().contains("escapes"), "{err}");
    }
}
