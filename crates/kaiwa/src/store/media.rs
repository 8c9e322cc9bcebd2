//! Uploaded files (R7), behind the [`MediaStore`] trait: on disk ([`DiskMedia`]) under
//! `<media-dir>/{images,videos,voices}`, a directory every gateway of a cluster shares (a
//! mounted volume); object storage can take its place. Workers never read these files.

use super::StoreError;
use crate::domain::MediaFormat;
use async_trait::async_trait;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use kaiwa_protocol::MessageType;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use tower::ServiceExt;
use tower_http::services::ServeFile;

/// Where uploaded files are kept. A file is named by its key, `media/<folder>/<name>`, which
/// the message stores in place of its content.
#[async_trait]
pub trait MediaStore: Send + Sync + 'static {
    /// Keeps a file under a name kaiwa makes up (never the client's), durably: when this
    /// returns, a message naming the key may be committed. Returns the key.
    async fn save(
        &self,
        kind: MessageType,
        format: &MediaFormat,
        bytes: Bytes,
    ) -> Result<String, StoreError>;

    /// Deletes a file saved for a message that was then not stored (a duplicate, a failed
    /// write). Failure only leaves an orphan file, so it is logged, not returned.
    async fn remove(&self, key: &str);

    /// Answers an HTTP request for the file `media/<folder>/<name>`, ranges and conditional
    /// requests included; `None` if no such file is stored.
    async fn serve(&self, folder: &str, name: &str, request: Request) -> Option<Response>;
}

/// Uploaded files in a directory.
#[derive(Debug, Clone)]
pub struct DiskMedia {
    /// Holds `images`, `videos` and `voices`.
    root: PathBuf,
}

/// The key prefix of every stored file.
const KEY_PREFIX: &str = "media/";

/// The folder of each media type.
fn folder(kind: MessageType) -> &'static str {
    match kind {
        MessageType::Image => "images",
        MessageType::Video => "videos",
        // Text has no files; voice is the only other kind.
        MessageType::Voice | MessageType::Text => "voices",
    }
}

impl DiskMedia {
    /// Creates the media folders under `root` if needed, and removes the half-written files a
    /// process killed while saving one left behind (no message names them: a message is
    /// stored only after its file is complete). In a cluster every gateway does this at start:
    /// a file half-written by a gateway that is still running is skipped if it is recent.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let mut removed = 0;
        for kind in [MessageType::Image, MessageType::Video, MessageType::Voice] {
            let dir = root.join(folder(kind));
            fs::create_dir_all(&dir)?;
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let path = entry.path();
                let stale = entry
                    .metadata()
                    .and_then(|meta| meta.modified())
                    .ok()
                    .and_then(|at| at.elapsed().ok())
                    .is_none_or(|age| age > PARTIAL_MAX_AGE);
                if path.extension().is_some_and(|ext| ext == PARTIAL) && stale {
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
            root: root.to_owned(),
        })
    }

    /// The file `media/<folder>/<name>` (see [`file`]).
    fn path(&self, folder: &str, name: &str) -> Option<PathBuf> {
        file(folder, name).map(|file| self.root.join(file))
    }

    fn key_path(&self, key: &str) -> Option<PathBuf> {
        key_file(key).map(|file| self.root.join(file))
    }
}

/// The file a key names, relative to the media directory; `None` for a key kaiwa never makes.
pub(crate) fn key_file(key: &str) -> Option<PathBuf> {
    let (folder, name) = key.strip_prefix(KEY_PREFIX)?.split_once('/')?;
    file(folder, name)
}

/// The file `<folder>/<name>` could name, relative to the media directory: `folder` one of the
/// media folders and `name` a plain name like the `<uuid>.<ext>` that [`DiskMedia::save`] makes
/// up (anything else, e.g. `..`, is not ours to serve).
fn file(folder: &str, name: &str) -> Option<PathBuf> {
    let known = [MessageType::Image, MessageType::Video, MessageType::Voice]
        .into_iter()
        .map(self::folder)
        .any(|known| known == folder);
    let plain = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
        && !name.starts_with('.');
    (known && plain).then(|| Path::new(folder).join(name))
}

#[async_trait]
impl MediaStore for DiskMedia {
    async fn save(
        &self,
        kind: MessageType,
        format: &MediaFormat,
        bytes: Bytes,
    ) -> Result<String, StoreError> {
        let name = format!("{}.{}", uuid::Uuid::new_v4().simple(), format.extension());
        let target = self.root.join(folder(kind)).join(&name);
        tokio::task::spawn_blocking(move || write_durably(&target, &bytes))
            .await
            .map_err(|join| StoreError::from(std::io::Error::other(join)))??;
        Ok(format!("{KEY_PREFIX}{}/{name}", folder(kind)))
    }

    async fn remove(&self, key: &str) {
        let Some(path) = self.key_path(key) else {
            tracing::warn!(key, "not a media key; nothing removed");
            return;
        };
        if let Err(err) = tokio::fs::remove_file(&path).await {
            tracing::warn!(path = %path.display(), %err, "could not remove an unused media file");
        }
    }

    async fn serve(&self, folder: &str, name: &str, request: Request) -> Option<Response> {
        let path = self.path(folder, name)?;
        let response = ServeFile::new(path)
            .oneshot(request)
            .await
            .unwrap_or_else(|never| match never {})
            .map(Body::new);
        (response.status() != StatusCode::NOT_FOUND).then_some(response)
    }
}

/// A half-written file younger than this may still be being written by another gateway.
const PARTIAL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

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
        DiskMedia::open(dir.path()).expect("opens");
        let images = dir.path().join("images");
        let partial = images.join("0123abcd.partial");
        fs::write(&partial, b"half a pict").expect("written");
        let old = std::time::SystemTime::now() - 2 * PARTIAL_MAX_AGE;
        fs::File::options()
            .write(true)
            .open(&partial)
            .and_then(|file| file.set_modified(old))
            .expect("aged");
        fs::write(images.join("89ab.partial"), b"being written").expect("written");
        fs::write(images.join("4567ef.png"), b"a whole picture").expect("written");
        DiskMedia::open(dir.path()).expect("opens again");
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
        assert_eq!(
            left,
            ["4567ef.png", "89ab.partial"],
            "a recent half-written file may belong to a gateway that is writing it"
        );
    }

    #[tokio::test]
    async fn a_saved_file_is_found_by_its_key_and_removed_by_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let media = DiskMedia::open(dir.path()).expect("opens");
        // The store names the file after the format admission found; which bytes make a PNG
        // is admission's business, not the store's.
        let format = MediaFormat {
            name: "PNG",
            mime: "image/png",
            extensions: &["png"],
        };
        let key = media
            .save(
                MessageType::Image,
                &format,
                Bytes::from_static(b"\x89PNG\r\n\x1a\n"),
            )
            .await
            .expect("saved");
        assert!(key.starts_with("media/images/"), "{key}");
        let path = media.key_path(&key).expect("a key of ours");
        assert!(path.is_file());
        media.remove(&key).await;
        assert!(!path.exists());
        assert_eq!(media.key_path("media/../kaiwa.db"), None);
    }
}
