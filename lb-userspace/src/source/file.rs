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
        let text = std::fs::read_to_string(&self.path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                object: self.path.display().to_string(),
                field: String::new(),
                message: e.to_string(),
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

/// Identity of the file's current content, cheap to poll; survives editors that replace the file
/// and ConfigMap symlink swaps because it follows the path each time.
fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.mtime(), m.mtime_nsec(), m.size(), m.ino()))
}
