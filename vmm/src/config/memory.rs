//! The `--memory` flag: `size=SIZE,backend=anon|memfd|gmem|file|hugetlb|thp[,path=P]
//! [,prefault=on][,page-size=2M|1G][,shared=on][,reserve=auto][,fallback=error|thp|4k]`,
//! and the same as a JSON object in a config file (`page_size` there).

use std::path::PathBuf;

use guest_mem::{BackendKind, BackendSpec, Fallback, Reserve, ZoneSpec, PAGE_1G, PAGE_2M};
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
    #[error(
        "unknown key '{0}' (expected size, backend, path, prefault, page-size, shared, reserve, fallback, private)"
    )]
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
    /// A key that does not apply to the backend.
    #[error("{key}= does not apply to backend={backend} (only to {only})")]
    NotForBackend {
        /// Key.
        key: &'static str,
        /// Backend given.
        backend: String,
        /// Backends it applies to.
        only: &'static str,
    },
    /// A page size the backend does not offer.
    #[error("page-size={0} is not offered (hugetlb: 2M or 1G; thp: 2M)")]
    PageSize(String),
    /// `private=on` on a backing without an fd.
    #[error(
        "private=on needs a backend with an fd ({0} has none: use memfd, gmem, file, hugetlb or thp with shared=on)"
    )]
    PrivateWithoutFd(String),
    /// Bad reserve value.
    #[error("reserve='{0}' is not auto or off")]
    Reserve(String),
    /// Bad fallback value.
    #[error("{0}")]
    Fallback(String),
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
    /// Huge page size (`hugetlb`: 2M or 1G; `thp`: 2M).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<String>,
    /// `thp`: a shared memfd instead of anonymous memory.
    #[serde(default)]
    pub shared: bool,
    /// `hugetlb`: `auto` grows the pool for this VM and restores it at exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve: Option<String>,
    /// `hugetlb`/`thp`: `error` (default), `thp` or `4k` when the pages cannot be had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// The zone starts private to the guest.
    #[serde(default)]
    pub private: bool,
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
        let (mut page_size, mut shared, mut reserve, mut fallback, mut private) = (None, false, None, None, false);
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| MemoryFlagError::NotKeyValue(part.into()))?;
            let k = if k == "page_size" { "page-size" } else { k };
            if !seen.insert(k.to_string()) {
                return Err(MemoryFlagError::Duplicate(k.into()));
            }
            match k {
                "size" => size = Some(SizeValue::Text(v.into())),
                "backend" => backend = Some(v.to_string()),
                "path" => path = Some(PathBuf::from(v)),
                "prefault" => prefault = on_off(k, v)?,
                "page-size" => page_size = Some(v.to_string()),
                "shared" => shared = on_off(k, v)?,
                "reserve" => reserve = Some(v.to_string()),
                "fallback" => fallback = Some(v.to_string()),
                "private" => private = on_off(k, v)?,
                _ => return Err(MemoryFlagError::UnknownKey(k.into())),
            }
        }
        let m = MemoryConfig {
            size: size.ok_or(MemoryFlagError::NoSize)?,
            backend: backend.unwrap_or_else(default_backend),
            path,
            prefault,
            page_size,
            shared,
            reserve,
            fallback,
            private,
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
        let not_for = |key, only| MemoryFlagError::NotForBackend { key, backend: self.backend.clone(), only };
        let huge = matches!(kind, BackendKind::Hugetlb | BackendKind::Thp);
        let mut backend = BackendSpec::new(kind);
        backend.path = self.path.clone();
        backend.prefault = self.prefault;
        if let Some(ps) = &self.page_size {
            if !huge {
                return Err(not_for("page-size", "hugetlb, thp"));
            }
            backend.page_size = match (kind, parse_size(ps)?) {
                (BackendKind::Hugetlb, p @ (PAGE_2M | PAGE_1G)) | (BackendKind::Thp, p @ PAGE_2M) => p,
                _ => return Err(MemoryFlagError::PageSize(ps.clone())),
            };
        }
        if self.shared {
            if kind != BackendKind::Thp {
                return Err(not_for("shared", "thp"));
            }
            backend.shared = true;
        }
        if let Some(r) = &self.reserve {
            if kind != BackendKind::Hugetlb {
                return Err(not_for("reserve", "hugetlb"));
            }
            backend.reserve = match r.as_str() {
                "auto" => Reserve::Auto,
                "off" => Reserve::Off,
                _ => return Err(MemoryFlagError::Reserve(r.clone())),
            };
        }
        if let Some(f) = &self.fallback {
            if !huge {
                return Err(not_for("fallback", "hugetlb, thp"));
            }
            backend.fallback = f.parse::<Fallback>().map_err(MemoryFlagError::Fallback)?;
            if kind == BackendKind::Thp && backend.fallback == Fallback::Thp {
                return Err(MemoryFlagError::Fallback("fallback=thp does not apply to backend=thp".into()));
            }
        }
        if let Some(p) = &self.path {
            // A file on hugetlbfs is made of huge pages: the zone is aligned to them.
            // (A path that cannot be inspected is reported when it is opened.)
            if let Ok(ps) = guest_mem::backend::file_page_size(p) {
                backend.page_size = ps;
            }
        }
        if self.private {
            if !backend.has_fd() {
                return Err(MemoryFlagError::PrivateWithoutFd(backend.describe()));
            }
            backend.private = true;
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
    fn parses_huge_page_flags() {
        let z = MemoryConfig::parse_flag("size=2G,backend=hugetlb,page-size=1G,reserve=auto,fallback=thp")
            .unwrap()
            .to_zone()
            .unwrap();
        assert_eq!(z.backend.kind, BackendKind::Hugetlb);
        assert_eq!(z.backend.page_size, PAGE_1G);
        assert_eq!(z.backend.reserve, Reserve::Auto);
        assert_eq!(z.backend.fallback, Fallback::Thp);
        let z = MemoryConfig::parse_flag("size=1G,backend=hugetlb").unwrap().to_zone().unwrap();
        assert_eq!(z.backend.page_size, PAGE_2M);
        let z = MemoryConfig::parse_flag("size=1G,backend=thp,shared=on,fallback=4k").unwrap().to_zone().unwrap();
        assert!(z.backend.shared && z.backend.has_fd());
        assert_eq!(z.backend.fallback, Fallback::FourK);
    }

    #[test]
    fn refuses_bad_huge_page_flags() {
        use MemoryFlagError::*;
        let e = |s| MemoryConfig::parse_flag(s).unwrap_err();
        assert_eq!(e("size=1G,backend=hugetlb,page-size=4M"), PageSize("4M".into()));
        assert_eq!(e("size=1G,backend=thp,page-size=1G"), PageSize("1G".into()));
        assert!(matches!(e("size=1G,backend=memfd,page-size=2M"), NotForBackend { key: "page-size", .. }));
        assert!(matches!(e("size=1G,backend=hugetlb,shared=on"), NotForBackend { key: "shared", .. }));
        assert!(matches!(e("size=1G,backend=thp,reserve=auto"), NotForBackend { key: "reserve", .. }));
        assert!(matches!(e("size=1G,backend=anon,fallback=4k"), NotForBackend { key: "fallback", .. }));
        assert_eq!(e("size=1G,backend=hugetlb,reserve=always"), Reserve("always".into()));
        assert!(matches!(e("size=1G,backend=hugetlb,fallback=swap"), Fallback(_)));
        assert!(matches!(e("size=1G,backend=thp,fallback=thp"), Fallback(_)));
    }

    #[test]
    fn private_needs_an_fd() {
        assert!(MemoryConfig::parse_flag("size=64M,private=on").unwrap().to_zone().unwrap().backend.private);
        let e = MemoryConfig::parse_flag("size=64M,backend=anon,private=on").unwrap_err();
        assert_eq!(e, MemoryFlagError::PrivateWithoutFd("anon".into()));
        assert!(MemoryConfig::parse_flag("size=64M,backend=thp,private=on").is_err());
        assert!(MemoryConfig::parse_flag("size=64M,backend=thp,shared=on,private=on").is_ok());
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
