//! Transparent huge page settings.
//!
//! Sources: `<sysfs>/kernel/mm/transparent_hugepage/{enabled,defrag,shmem_enabled,hpage_pmd_size}`
//! and the per-size (mTHP) `<sysfs>/kernel/mm/transparent_hugepage/hugepages-<N>kB/{enabled,shmem_enabled}`.
//! Each setting file lists every choice with the active one in brackets, e.g.
//! `always [madvise] never`. A missing file is reported as `None` (older kernels lack the
//! per-size files); a file whose active value cannot be found or is unknown is an error.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{parse_size_dir, SYSFS_ROOT};

/// Errors reading THP settings.
#[derive(Debug, thiserror::Error)]
pub enum ThpError {
    /// A sysfs file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A string is not one of the values of the setting enum it was parsed as.
    #[error("unknown THP setting value {0:?}")]
    UnknownValue(String),
    /// A setting file had no bracketed active value, or an unknown one.
    #[error("{path}: cannot parse active value from {text:?}")]
    Parse {
        /// The file (or `"<text>"` when parsing a string).
        path: PathBuf,
        /// What it held (trimmed, truncated to 128 bytes).
        text: String,
    },
}

macro_rules! setting_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// The kernel's spelling of this value.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ThpError;
            fn from_str(s: &str) -> Result<Self, ThpError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(ThpError::UnknownValue(other.chars().take(64).collect())),
                }
            }
        }
    };
}

setting_enum!(
    /// Anonymous-memory THP mode (`enabled`, and per-size `hugepages-<N>kB/enabled`).
    ThpEnabled {
        /// Huge pages for all anonymous memory.
        Always = "always",
        /// Huge pages only in `MADV_HUGEPAGE` regions.
        Madvise = "madvise",
        /// No huge pages.
        Never = "never",
        /// Per-size only: follow the top-level `enabled`.
        Inherit = "inherit",
    }
);

setting_enum!(
    /// THP defragmentation mode (`defrag`): what a huge page fault does when no free
    /// huge page is at hand.
    ThpDefrag {
        /// Compact synchronously on every THP fault.
        Always = "always",
        /// Wake kswapd/kcompactd and fall back to small pages.
        Defer = "defer",
        /// Compact synchronously in `MADV_HUGEPAGE` regions, defer elsewhere.
        DeferMadvise = "defer+madvise",
        /// Compact synchronously in `MADV_HUGEPAGE` regions only.
        Madvise = "madvise",
        /// Never compact; use a huge page only if one is free.
        Never = "never",
    }
);

setting_enum!(
    /// shmem/tmpfs/memfd THP mode (`shmem_enabled`, per-size `hugepages-<N>kB/shmem_enabled`).
    ShmemEnabled {
        /// Huge pages whenever possible.
        Always = "always",
        /// Huge pages only where they fit inside the file size.
        WithinSize = "within_size",
        /// Huge pages only in `MADV_HUGEPAGE` regions (and `huge=` mounts).
        Advise = "advise",
        /// No huge pages (except via `huge=` mount options).
        Never = "never",
        /// Emergency off: no huge pages anywhere, overriding mounts.
        Deny = "deny",
        /// Huge pages everywhere, overriding mounts (testing).
        Force = "force",
        /// Per-size only: follow the top-level `shmem_enabled`.
        Inherit = "inherit",
    }
);

impl ThpEnabled {
    /// Whether a `MADV_HUGEPAGE` region gets huge pages under this mode
    /// (`Inherit` must be resolved first and gives `false`).
    pub fn honours_madvise(self) -> bool {
        matches!(self, ThpEnabled::Always | ThpEnabled::Madvise)
    }
}

impl ShmemEnabled {
    /// Whether a `MADV_HUGEPAGE` region of a memfd gets huge pages under this mode
    /// (`within_size` does if the region lies inside the file size; `Inherit` must be
    /// resolved first and gives `false`).
    pub fn honours_madvise(self) -> bool {
        matches!(self, ShmemEnabled::Always | ShmemEnabled::WithinSize | ShmemEnabled::Advise | ShmemEnabled::Force)
    }
}

/// The per-size (mTHP) settings of one page size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThpSize {
    /// Page size in bytes.
    pub page_size: u64,
    /// Anonymous-memory mode for this size; `None` if the file is missing.
    pub enabled: Option<ThpEnabled>,
    /// shmem mode for this size; `None` if the file is missing (kernels before 6.11).
    pub shmem_enabled: Option<ShmemEnabled>,
}

/// All THP settings of the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThpSettings {
    /// Top-level anonymous mode; `None` if THP is absent from the kernel.
    pub enabled: Option<ThpEnabled>,
    /// Defragmentation mode.
    pub defrag: Option<ThpDefrag>,
    /// Top-level shmem mode.
    pub shmem_enabled: Option<ShmemEnabled>,
    /// PMD huge page size in bytes (`hpage_pmd_size`), usually 2 MiB.
    pub pmd_size: Option<u64>,
    /// Per-size settings sorted by page size; empty before mTHP (6.8).
    pub sizes: Vec<ThpSize>,
}

impl ThpSettings {
    /// The per-size entry of `page_size`, if the kernel has one.
    pub fn size(&self, page_size: u64) -> Option<&ThpSize> {
        self.sizes.iter().find(|s| s.page_size == page_size)
    }

    /// The anonymous mode that applies to `page_size` after resolving `inherit`.
    /// Without per-size files, the top-level mode applies to the PMD size only.
    pub fn effective_enabled(&self, page_size: u64) -> Option<ThpEnabled> {
        match self.size(page_size) {
            Some(s) => match s.enabled? {
                ThpEnabled::Inherit => self.enabled,
                v => Some(v),
            },
            None if Some(page_size) == self.pmd_size => self.enabled,
            None => None,
        }
    }

    /// The shmem mode that applies to `page_size` after resolving `inherit`.
    /// Without a per-size file, the top-level mode applies to the PMD size only.
    pub fn effective_shmem(&self, page_size: u64) -> Option<ShmemEnabled> {
        match self.size(page_size).and_then(|s| s.shmem_enabled) {
            Some(ShmemEnabled::Inherit) => self.shmem_enabled,
            Some(v) => Some(v),
            None if Some(page_size) == self.pmd_size => self.shmem_enabled,
            None => None,
        }
    }
}

/// Returns the bracketed active value of a sysfs setting line, e.g. `madvise` from
/// `always [madvise] never`; `None` if there is no bracketed word.
pub fn active_value(text: &str) -> Option<&str> {
    let open = text.find('[')?;
    let rest = &text[open + 1..];
    let close = rest.find(']')?;
    let v = rest[..close].trim();
    (!v.is_empty()).then_some(v)
}

/// Parses a whole setting file's text into its active value.
pub fn parse_setting<T: FromStr>(text: &str) -> Option<T> {
    active_value(text)?.parse().ok()
}

/// Reads an optional setting file: `Ok(None)` if it does not exist.
fn read_setting<T: FromStr>(path: &Path) -> Result<Option<T>, ThpError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ThpError::Io { path: path.to_path_buf(), source }),
    };
    parse_setting(&text)
        .map(Some)
        .ok_or_else(|| ThpError::Parse { path: path.to_path_buf(), text: text.trim().chars().take(128).collect() })
}

/// Reads `hpage_pmd_size`: `Ok(None)` if missing, an error if not an integer.
fn read_pmd_size(path: &Path) -> Result<Option<u64>, ThpError> {
    match std::fs::read_to_string(path) {
        Ok(t) => t
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ThpError::Parse { path: path.to_path_buf(), text: t.trim().chars().take(128).collect() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ThpError::Io { path: path.to_path_buf(), source }),
    }
}

/// The host's THP settings.
pub fn thp() -> Result<ThpSettings, ThpError> {
    thp_at(Path::new(SYSFS_ROOT))
}

/// [`thp`] with `root` standing for the sysfs mount point (normally `/sys`).
/// A kernel without THP gives all fields `None`/empty.
pub fn thp_at(root: &Path) -> Result<ThpSettings, ThpError> {
    let dir = root.join("kernel/mm/transparent_hugepage");
    let mut s = ThpSettings {
        enabled: read_setting(&dir.join("enabled"))?,
        defrag: read_setting(&dir.join("defrag"))?,
        shmem_enabled: read_setting(&dir.join("shmem_enabled"))?,
        pmd_size: read_pmd_size(&dir.join("hpage_pmd_size"))?,
        sizes: Vec::new(),
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(s),
        Err(source) => return Err(ThpError::Io { path: dir, source }),
    };
    for entry in entries {
        let entry = entry.map_err(|source| ThpError::Io { path: dir.clone(), source })?;
        let name = entry.file_name();
        let Some(page_size) = name.to_str().and_then(parse_size_dir) else {
            continue;
        };
        let d = entry.path();
        s.sizes.push(ThpSize {
            page_size,
            enabled: read_setting(&d.join("enabled"))?,
            shmem_enabled: read_setting(&d.join("shmem_enabled"))?,
        });
    }
    s.sizes.sort_by_key(|z| z.page_size);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempTree;

    const D: &str = "kernel/mm/transparent_hugepage";

    #[test]
    fn active_values() {
        assert_eq!(active_value("always [madvise] never\n"), Some("madvise"));
        assert_eq!(active_value("[always] madvise never"), Some("always"));
        assert_eq!(active_value("always madvise never"), None);
        assert_eq!(active_value("always [madvise never"), None);
        assert_eq!(active_value("[]"), None);
        assert_eq!(
            parse_setting::<ThpDefrag>("always defer [defer+madvise] madvise never"),
            Some(ThpDefrag::DeferMadvise)
        );
        assert_eq!(
            parse_setting::<ShmemEnabled>("always [within_size] advise never deny force"),
            Some(ShmemEnabled::WithinSize)
        );
        assert_eq!(
            parse_setting::<ShmemEnabled>("always [inherit] within_size advise never"),
            Some(ShmemEnabled::Inherit)
        );
        assert_eq!(parse_setting::<ThpEnabled>("[sometimes] never"), None);
        assert_eq!("defer+madvise".parse::<ThpDefrag>().unwrap(), ThpDefrag::DeferMadvise);
        assert!(matches!(
            "maybe".parse::<ThpEnabled>(),
            Err(ThpError::UnknownValue(v)) if v == "maybe"
        ));
        assert_eq!(ShmemEnabled::WithinSize.to_string(), "within_size");
    }

    fn fixture() -> TempTree {
        let t = TempTree::new("thp");
        t.write(&format!("{D}/enabled"), "always [madvise] never\n");
        t.write(&format!("{D}/defrag"), "always defer defer+madvise [madvise] never\n");
        t.write(&format!("{D}/shmem_enabled"), "always within_size advise [never] deny force\n");
        t.write(&format!("{D}/hpage_pmd_size"), "2097152\n");
        t.write(&format!("{D}/use_zero_page"), "1\n");
        t.mkdir(&format!("{D}/khugepaged"));
        t.write(&format!("{D}/hugepages-2048kB/enabled"), "always [inherit] madvise never\n");
        t.write(&format!("{D}/hugepages-2048kB/shmem_enabled"), "always [inherit] within_size advise never\n");
        t.write(&format!("{D}/hugepages-64kB/enabled"), "always inherit [madvise] never\n");
        t.write(&format!("{D}/hugepages-64kB/shmem_enabled"), "always inherit within_size [advise] never\n");
        t.write(&format!("{D}/hugepages-16kB/enabled"), "always inherit madvise [never]\n");
        t
    }

    #[test]
    fn reads_tree() {
        let t = fixture();
        let s = thp_at(t.path()).unwrap();
        assert_eq!(s.enabled, Some(ThpEnabled::Madvise));
        assert_eq!(s.defrag, Some(ThpDefrag::Madvise));
        assert_eq!(s.shmem_enabled, Some(ShmemEnabled::Never));
        assert_eq!(s.pmd_size, Some(2 << 20));
        let sizes: Vec<u64> = s.sizes.iter().map(|z| z.page_size).collect();
        assert_eq!(sizes, [16 << 10, 64 << 10, 2 << 20]);
        assert_eq!(s.sizes[0].shmem_enabled, None);
        assert_eq!(s.size(2 << 20).unwrap().enabled, Some(ThpEnabled::Inherit));
        assert_eq!(s.effective_enabled(2 << 20), Some(ThpEnabled::Madvise));
        assert_eq!(s.effective_shmem(2 << 20), Some(ShmemEnabled::Never));
        assert_eq!(s.effective_enabled(64 << 10), Some(ThpEnabled::Madvise));
        assert_eq!(s.effective_shmem(64 << 10), Some(ShmemEnabled::Advise));
        assert_eq!(s.effective_enabled(16 << 10), Some(ThpEnabled::Never));
        assert_eq!(s.effective_enabled(32 << 10), None);
        assert!(!s.effective_shmem(2 << 20).unwrap().honours_madvise());
        assert!(s.effective_enabled(2 << 20).unwrap().honours_madvise());
    }

    #[test]
    fn old_kernel_and_no_thp() {
        let t = TempTree::new("thp-old");
        t.write(&format!("{D}/enabled"), "[always] madvise never\n");
        t.write(&format!("{D}/hpage_pmd_size"), "2097152\n");
        let s = thp_at(t.path()).unwrap();
        assert_eq!(s.defrag, None);
        assert!(s.sizes.is_empty());
        assert_eq!(s.effective_enabled(2 << 20), Some(ThpEnabled::Always));
        assert_eq!(s.effective_shmem(2 << 20), None);

        let empty = TempTree::new("thp-none");
        assert_eq!(thp_at(empty.path()).unwrap(), ThpSettings::default());
    }

    #[test]
    fn garbage_is_an_error() {
        let t = fixture();
        t.write(&format!("{D}/enabled"), "always madvise never\n");
        assert!(matches!(thp_at(t.path()), Err(ThpError::Parse { .. })));
        let t = fixture();
        t.write(&format!("{D}/hugepages-64kB/enabled"), "[sometimes]\n");
        assert!(matches!(thp_at(t.path()), Err(ThpError::Parse { .. })));
        let t = fixture();
        t.write(&format!("{D}/hpage_pmd_size"), "big\n");
        assert!(matches!(thp_at(t.path()), Err(ThpError::Parse { .. })));
    }

    #[test]
    fn serde_names() {
        let t = fixture();
        let s = thp_at(t.path()).unwrap();
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains(r#""defrag":"madvise""#), "{j}");
        assert!(j.contains(r#""enabled":"inherit""#), "{j}");
        let back: ThpSettings = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        assert_eq!(serde_json::to_string(&ThpDefrag::DeferMadvise).unwrap(), r#""defer+madvise""#);
    }
}
