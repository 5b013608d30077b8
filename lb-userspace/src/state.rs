//! The JSON files the agent keeps in `--state-dir` for lbctl and its own next run, each written
//! atomically (a temporary file renamed over it); those its next run relies on also durably (the
//! file and the directory fsynced), so a crash or power cut leaves the old file or the new one,
//! never a torn one.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Serialize, de::DeserializeOwned};

pub fn write(dir: &Path, name: &str, value: &impl Serialize) -> Result<()> {
    replace(dir, name, value, true)
}

/// As [`write`], without the fsyncs: for runtime information rewritten after every reload
/// (agent.json, maglev.json), where losing the last version to a power cut costs nothing.
pub fn write_volatile(dir: &Path, name: &str, value: &impl Serialize) -> Result<()> {
    replace(dir, name, value, false)
}

/// A temporary file renamed over `name`; with `durable`, the file and the directory fsynced.
fn replace(dir: &Path, name: &str, value: &impl Serialize, durable: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        use std::io::Write;
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(value)?)?;
        if durable {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, dir.join(name))?;
    if durable {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// None when the file does not exist (a first run); an error when it exists but cannot be read
/// or parsed (reported, never taken as "no state").
pub fn read_if_present<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>> {
    if !dir.join(name).exists() {
        return Ok(None);
    }
    read(dir, name).map(Some)
}

pub fn read<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (has lb-agent run with this --state-dir?)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_is_none_corrupt_is_an_error_written_reads_back() {
        let dir = std::env::temp_dir().join(format!("lb-state-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            read_if_present::<Vec<u32>>(&dir, "x.json")
                .unwrap()
                .is_none()
        );
        write(&dir, "x.json", &vec![1u32, 2]).unwrap();
        assert_eq!(
            read_if_present::<Vec<u32>>(&dir, "x.json").unwrap(),
            Some(vec![1, 2])
        );
        assert!(!dir.join(".x.json.tmp").exists());
        std::fs::write(dir.join("x.json"), "{ cut off").unwrap();
        let e = read_if_present::<Vec<u32>>(&dir, "x.json").unwrap_err();
        assert!(format!("{e:#}").contains("parsing"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
