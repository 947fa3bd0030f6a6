//! The ready file: where a process tells whoever started it which addresses it
//! actually bound.
//!
//! Every listener of the registry, the sidecar and the demo app accepts port 0.
//! A test (or a supervisor) then cannot know the ports in advance, and picking
//! a "free" port by binding and releasing it races with every other process
//! on the machine. Instead the process writes a small JSON object to the path
//! given by `--ready-file` once all its listeners are bound, so connections are
//! already queued by the kernel when the file appears.
//!
//! The file is written to a temporary name beside it and renamed into place,
//! so a reader polling for it never sees half an object.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

/// Writes `addresses` as JSON to `path`, atomically (write, fsync, rename).
pub fn write(path: &Path, addresses: &impl Serialize) -> std::io::Result<()> {
    let json = serde_json::to_vec(addresses).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&json)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    #[test]
    fn writes_the_object_in_one_piece() {
        let dir = std::env::temp_dir().join(format!("trellis-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ready.json");
        let addrs = BTreeMap::from([("listen", "127.0.0.1:4242")]);
        super::write(&path, &addrs).unwrap();
        let back: BTreeMap<String, String> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back["listen"], "127.0.0.1:4242");
        // Nothing else is left beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
