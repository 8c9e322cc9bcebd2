//! No accepted message waits for a restart: when storing its replies fails (here, a full disk),
//! the running server tries again once it can, and the client gets its replies.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{TestApp, eventually, files, send_file};

/// A small tmpfs of its own, so that the test can fill it without filling the machine.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("a mount point");
        let path = dir.path().to_path_buf();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "kaiwa-test"])
            .arg(&path)
            .output()
            .expect("the mount command runs");
        assert!(
            mounted.status.success(),
            "this test mounts a {size} tmpfs to fill it up, which needs root (or CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&mounted.stderr)
        );
        SmallDisk { path, _dir: dir }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path.join("filler");
        let mut file = std::fs::File::create(&path).expect("the filler file");
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if let Err(err) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
                assert_eq!(
                    err.raw_os_error(),
                    Some(28),
                    "the disk fills up (ENOSPC): {err}"
                );
                return path;
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily, so that a server still closing its files cannot keep the mount alive.
        let _unmounted = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test]
async fn replies_that_could_not_be_stored_on_a_full_disk_come_once_it_has_room_again() {
    let disk = SmallDisk::mount("8m");
    let dir = tempfile::tempdir_in(disk.path()).expect("a data directory on the small disk");
    // Image replies are due 2–3 s after their message: time to fill the disk after the acks.
    let app = TestApp::spawn_in(dir, &["--reply-delay-scale", "1", "--requeue-after", "0.3"]).await;
    let mut client = app.native("patient", "UTC").await;
    let ids: Vec<String> = (0..4).map(|n| format!("p{n}")).collect();
    for id in &ids {
        client
            .send_json(send_file(id, "image", "a.png", &files::png()))
            .await;
        let ack = client.until(|f| f["type"] == "ack").await;
        assert_eq!(ack["status"], "accepted", "{ack}");
    }

    let filler = disk.fill();
    let mut failed = std::collections::HashSet::new();
    while failed.len() < ids.len() {
        let frame = client.next_json().await;
        assert_ne!(
            frame["type"], "reply",
            "no reply can be stored on a full disk: {frame}"
        );
        if frame["type"] == "error" {
            assert_eq!(frame["code"], "processing_failed", "{frame}");
            failed.insert(frame["id"].as_str().expect("the message's id").to_owned());
        }
    }

    // Room again: the sweeper queues the stuck messages again, without a restart.
    std::fs::remove_file(filler).expect("the filler removed");
    let mut replied = std::collections::HashSet::new();
    let mut replies = 0;
    while replied.len() < ids.len() {
        let frame = client.next_json().await;
        match frame["type"].as_str() {
            Some("reply") => replies += 1,
            Some("status") if frame["status"] == "replied" => {
                replied.insert(frame["id"].as_str().expect("an id").to_owned());
            }
            _ => {}
        }
    }
    assert_eq!(
        replies,
        3 * ids.len(),
        "each message gets its three replies, once"
    );
    eventually("every message replied in the history", || async {
        let (_, page) = app.get_json("/api/v1/clients/patient/messages").await;
        let messages = page["messages"].as_array()?;
        (messages.len() == ids.len() && messages.iter().all(|m| m["status"] == "replied"))
            .then_some(())
    })
    .await;
    drop(app);
}
