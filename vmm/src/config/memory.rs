//! The `--memory` flag: `size=SIZE,backend=anon|memfd|gmem|file[,path=P][,prefault=on]`,
//! and the same as a JSON object in a config file.

use std::path::PathBuf;

use guest_mem::{BackendKind, BackendSpec, ZoneSpec};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::size::{parse_size, SizeError};

/// Errors in one `--memory` value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MemoryFlagError {
    /// `key` without `=value`.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key Mosaic does not know.
    #[error("unknown key '{0}' (expected size, backend, path, prefault)")]
    UnknownKey(String),
    /// A key given twice.
    #[error("'{0}' given twice")]
    Duplicate(String),
    /// Bad size.
    #[error(transparent)]
    Size(#[from] SizeError),
    /// Bad backend.
    #[error(transparent)]
    Backend(#[from] guest_mem::backend::UnknownBackend),
    /// Bad on/off.
    #[error("{key}='{value}' is not on or off")]
    OnOff {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// `size` missing.
    #[error("size= is required")]
    NoSize,
    /// `path` with a backend other than file.
    #[error("path= is only for backend=file")]
    PathWithoutFile,
    /// `backend=file` without a path.
    #[error("backend=file needs path=")]
    FileWithoutPath,
}

/// A size as written: `"256M"` or a number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    /// Bytes.
    Bytes(u64),
    /// Text such as "256M".
    Text(String),
}

/// One memory zone as configured (flag or JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Size.
    pub size: SizeValue,
    /// Backend (default memfd).
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Path for `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Prefault before start.
    #[serde(default)]
    pub prefault: bool,
}

fn default_backend() -> String {
    BackendKind::Memfd.name().to_string()
}

fn on_off(key: &str, v: &str) -> Result<bool, MemoryFlagError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(MemoryFlagError::OnOff { key: key.into(), value: v.into() }),
    }
}

impl MemoryConfig {
    /// Parses a `--memory` value.
    pub fn parse_flag(s: &str) -> Result<Self, MemoryFlagError> {
        let mut seen = std::collections::HashSet::new();
        let (mut size, mut backend, mut path, mut prefault) = (None, None, None, false);
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| MemoryFlagError::NotKeyValue(part.into()))?;
            if !seen.insert(k.to_string()) {
                return Err(MemoryFlagError::Duplicate(k.into()));
            }
            match k {
                "size" => size = Some(SizeValue::Text(v.into())),
                "backend" => backend = Some(v.to_string()),
                "path" => path = Some(PathBuf::from(v)),
                "prefault" => prefault = on_off(k, v)?,
                _ => return Err(MemoryFlagError::UnknownKey(k.into())),
            }
        }
        let m = MemoryConfig {
            size: size.ok_or(MemoryFlagError::NoSize)?,
            backend: backend.unwrap_or_else(default_backend),
            path,
            prefault,
        };
        m.to_zone()?;
        Ok(m)
    }

    /// The zone this describes.
    pub fn to_zone(&self) -> Result<ZoneSpec, MemoryFlagError> {
        let size = match &self.size {
            SizeValue::Bytes(b) => *b,
            SizeValue::Text(t) => parse_size(t)?,
        };
        let kind: BackendKind = self.backend.parse()?;
        match (kind, &self.path) {
            (BackendKind::File, None) => return Err(MemoryFlagError::FileWithoutPath),
            (k, Some(_)) if k != BackendKind::File => return Err(MemoryFlagError::PathWithoutFile),
            _ => {}
        }
        let mut backend = BackendSpec::new(kind);
        backend.path = self.path.clone();
        backend.prefault = self.prefault;
        if let Some(p) = &self.path {
            // A file on hugetlbfs is made of huge pages: the zone is aligned to them.
            // (A path that cannot be inspected is reported when it is opened.)
            if let Ok(ps) = guest_mem::backend::file_page_size(p) {
                backend.page_size = ps;
            }
        }
        Ok(ZoneSpec { size, backend })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        let z = MemoryConfig::parse_flag("size=256M,backend=anon,prefault=on").unwrap().to_zone().unwrap();
        assert_eq!(z.size, 256 << 20);
        assert_eq!(z.backend.kind, BackendKind::Anon);
        assert!(z.backend.prefault);
        let z = MemoryConfig::parse_flag("size=1G").unwrap().to_zone().unwrap();
        assert_eq!(z.backend.kind, BackendKind::Memfd);
        let z = MemoryConfig::parse_flag("size=64M,backend=file,path=/dev/shm/x").unwrap().to_zone().unwrap();
        assert_eq!(z.backend.path.as_deref(), Some(std::path::Path::new("/dev/shm/x")));
    }

    #[test]
    fn refuses_bad_flags() {
        use MemoryFlagError::*;
        let e = |s| MemoryConfig::parse_flag(s).unwrap_err();
        assert!(matches!(e("size=12Q"), Size(_)));
        assert!(matches!(e("size=1G,backend=hugetlbz"), Backend(_)));
        assert_eq!(e("backend=anon"), NoSize);
        assert_eq!(e("size=1G,colour=red"), UnknownKey("colour".into()));
        assert_eq!(e("size=1G,size=2G"), Duplicate("size".into()));
        assert_eq!(e("size"), NotKeyValue("size".into()));
        assert_eq!(e("size=1G,backend=file"), FileWithoutPath);
        assert_eq!(e("size=1G,path=/x"), PathWithoutFile);
        assert!(matches!(e("size=1G,prefault=maybe"), OnOff { .. }));
    }
}
