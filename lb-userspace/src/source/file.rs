//! `--config FILE`: a multi-document YAML file, polled and rebuilt when it changes. The file is
//! edited as a whole, so it is accepted or rejected as a whole.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use super::Built;
use crate::config::{self, BuildContext, ConfigCache, ConfigError, ConfigErrors};

pub struct FileSource {
    path: PathBuf,
    /// Parsed documents of the last reads: a reload parses only what changed.
    cache: ConfigCache,
    seen: Option<Fingerprint>,
    interval: Duration,
}

type Fingerprint = (i64, i64, u64, u64);

/// Largest config file read: 10k Services with 10 endpoints each take about 10 MB; a file this
/// big is a mistake (a log, a binary), refused before it is read into memory.
pub const MAX_CONFIG_BYTES: u64 = 128 << 20;

impl FileSource {
    pub fn new(path: PathBuf, interval: Duration) -> Self {
        let seen = fingerprint(&path);
        FileSource {
            path,
            cache: ConfigCache::default(),
            seen,
            interval,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns once the file's identity changed (content written, file replaced).
    pub async fn changed(&mut self) {
        loop {
            tokio::time::sleep(self.interval).await;
            let now = fingerprint(&self.path);
            if now != self.seen {
                self.seen = now;
                return;
            }
        }
    }

    pub fn build(&mut self, ctx: &BuildContext) -> Result<Built, ConfigErrors> {
        let text = read_limited(&self.path, MAX_CONFIG_BYTES).map_err(|message| {
            ConfigErrors(vec![ConfigError {
                object: self.path.display().to_string(),
                field: String::new(),
                message,
            }])
        })?;
        let (desired, objects) = config::load_cached(&mut self.cache, &text, ctx)?;
        Ok(Built {
            desired,
            ignored: objects.ignored.clone(),
            set_aside: Vec::new(),
        })
    }
}

/// The file's text, or why not: unreadable, not UTF-8, or more than `max` bytes (never read
/// past that).
fn read_limited(path: &Path, max: u64) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!(
            "more than {max} bytes: too large for a config file (refused unread)"
        ));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))
}

/// Identity of the file's current content, cheap to poll; survives editors that replace the file
/// and ConfigMap symlink swaps because it follows the path each time.
fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.mtime(), m.mtime_nsec(), m.size(), m.ino()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_oversized_file_is_refused_without_reading_it_whole() {
        let path = std::env::temp_dir().join(format!("lb-oversized-{}.yaml", std::process::id()));
        std::fs::write(&path, "x".repeat(2048)).unwrap();
        let e = super::read_limited(&path, 1024).unwrap_err();
        assert!(e.contains("more than 1024 bytes"), "{e}");
        assert_eq!(super::read_limited(&path, 4096).unwrap().len(), 2048);
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(
            super::read_limited(&path, 1024)
                .unwrap_err()
                .contains("UTF-8")
        );
        let _ = std::fs::remove_file(&path);
    }
}
