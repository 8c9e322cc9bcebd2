//! Uploaded files on disk, under `<data-dir>/media/{images,videos,voices}` (R7).

use super::StoreError;
use crate::admission::media::MediaFormat;
use bytes::Bytes;
use kaiwa_protocol::MessageType;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct MediaStore {
    data_dir: PathBuf,
}

/// The folder of each media type, relative to the data directory.
fn folder(kind: MessageType) -> &'static str {
    match kind {
        MessageType::Image => "media/images",
        MessageType::Video => "media/videos",
        // Text has no files; voice is the only other kind.
        MessageType::Voice | MessageType::Text => "media/voices",
    }
}

impl MediaStore {
    /// Creates the media folders if needed, and removes the half-written files a process
    /// killed while saving one left behind (no message names them: a message is stored only
    /// after its file is complete).
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let mut removed = 0;
        for kind in [MessageType::Image, MessageType::Video, MessageType::Voice] {
            let dir = data_dir.join(folder(kind));
            fs::create_dir_all(&dir)?;
            for entry in fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|ext| ext == PARTIAL) {
                    fs::remove_file(&path)?;
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                files = removed,
                "half-written media files of an earlier run removed"
            );
        }
        Ok(Self {
            data_dir: data_dir.to_owned(),
        })
    }

    /// The stored file `media/<folder>/<file>`, if those could name one: `folder` one of the
    /// media folders and `file` a plain name like the `<uuid>.<ext>` that [`MediaStore::save`]
    /// makes up (anything else, e.g. `..`, is not ours to serve). Whether it exists is the
    /// caller's to find out.
    pub fn stored_file(&self, folder: &str, file: &str) -> Option<PathBuf> {
        let folder = [MessageType::Image, MessageType::Video, MessageType::Voice]
            .into_iter()
            .map(self::folder)
            .find(|known| known.strip_prefix("media/") == Some(folder))?;
        let plain = !file.is_empty()
            && file.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
            && !file.starts_with('.');
        plain.then(|| self.data_dir.join(folder).join(file))
    }

    /// Writes a file under a name kaiwa makes up (never the client's), durably: the file and
    /// its directory entry are synced before the message that names it is committed.
    /// Returns the path relative to the data directory.
    pub async fn save(
        &self,
        kind: MessageType,
        format: &MediaFormat,
        bytes: Bytes,
    ) -> Result<String, StoreError> {
        let relative = format!(
            "{}/{}.{}",
            folder(kind),
            uuid::Uuid::new_v4().simple(),
            format.extension()
        );
        let target = self.data_dir.join(&relative);
        tokio::task::spawn_blocking(move || write_durably(&target, &bytes))
            .await
            .map_err(|join| StoreError::from(std::io::Error::other(join)))??;
        Ok(relative)
    }

    /// Deletes a file saved for a message that was then not stored (a duplicate, or a failed
    /// write). Failure only leaves an orphan file, so it is logged, not returned.
    pub async fn remove(&self, relative: &str) {
        let path = self.data_dir.join(relative);
        if let Err(err) = tokio::fs::remove_file(&path).await {
            tracing::warn!(path = %path.display(), %err, "could not remove an unused media file");
        }
    }
}

/// The extension of a file being written; it gets its real name once complete and synced.
const PARTIAL: &str = "partial";

fn write_durably(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = target.with_extension(PARTIAL);
    let mut file = fs::File::create(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&partial, target)?;
    if let Some(dir) = target.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_written_files_are_removed_at_start_and_complete_ones_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        MediaStore::open(dir.path()).expect("opens");
        let images = dir.path().join("media/images");
        fs::write(images.join("0123abcd.partial"), b"half a pict").expect("written");
        fs::write(images.join("4567ef.png"), b"a whole picture").expect("written");
        MediaStore::open(dir.path()).expect("opens again");
        let mut left: Vec<String> = fs::read_dir(&images)
            .expect("listed")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        left.sort();
        assert_eq!(left, ["4567ef.png"]);
    }
}
