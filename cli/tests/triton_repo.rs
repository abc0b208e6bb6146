//! `zimage triton-repo`: the repository it writes and its exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn zimage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zimage")).args(args).current_dir(root()).output().expect("run zimage")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-triton-repo").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn assert_code(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "stderr: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn writes_a_gpu_repository_and_refuses_to_overwrite_it() {
    let out = scratch("gpu");
    let repo = out.to_str().unwrap();
    let args = [
        "triton-repo",
        "--model",
        "models/tiny-zimage",
        "--out",
        repo,
        "--device",
        "cuda",
        "--gpus",
        "0,1",
        "--instances",
        "2",
    ];
    let written = zimage(&args);
    assert_code(&written, 0);
    assert!(String::from_utf8_lossy(&written.stdout).starts_with(&format!("wrote {}/zimage\n", repo)));
    let config = std::fs::read_to_string(out.join("zimage/config.pbtxt")).unwrap();
    assert!(config.contains("    count: 2\n    kind: KIND_GPU\n    gpus: [ 0, 1 ]\n"), "{config}");
    assert!(config.contains("parameters: { key: \"device\" value: { string_value: \"cuda\" } }"));
    assert_eq!(
        std::fs::read_link(out.join("zimage/1/model")).unwrap(),
        root().join("models/tiny-zimage").canonicalize().unwrap()
    );

    let again = zimage(&args);
    assert_code(&again, 9);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn bad_arguments_and_packages_have_their_exit_codes() {
    let out = scratch("bad");
    let repo = out.to_str().unwrap();
    assert_code(&zimage(&["triton-repo", "--model", "models/tiny-zimage", "--out", repo, "--device", "gpu"]), 2);
    assert_code(&zimage(&["triton-repo", "--model", "models/missing", "--out", repo]), 3);
    let cpu_gpus = zimage(&["triton-repo", "--model", "models/tiny-zimage", "--out", repo, "--gpus", "0"]);
    assert_code(&cpu_gpus, 6);
    // What the backend would refuse at load is refused before anything is written, as
    // generate refuses it: an unknown ControlNet, a count out of range, a file that is no LoRA.
    let base = ["triton-repo", "--model", "models/tiny-zimage-control", "--out", repo];
    let unknown = zimage(&[&base[..], &["--controlnet", "nope"]].concat());
    assert_code(&unknown, 6);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no such ControlNet (it has: "), "{unknown:?}");
    for count in ["0", "65", "4294967295"] {
        assert_code(&zimage(&[&base[..], &["--max-count", count]].concat()), 6);
    }
    assert_code(&zimage(&[&base[..], &["--lora", "Cargo.toml"]].concat()), 10);
    // A thread count the backend refuses at load (1..=1024) is refused here, with this
    // subcommand's help named.
    for threads in ["0", "1025"] {
        let bad = zimage(&[&base[..], &["--threads", threads]].concat());
        assert_code(&bad, 2);
        assert!(String::from_utf8_lossy(&bad.stderr).contains("zimage triton-repo --help"), "{bad:?}");
    }
    assert!(!out.join("zimage").exists());
    // --out naming a file: an I/O error that says so.
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let bad = zimage(&["triton-repo", "--model", "models/tiny-zimage", "--out", file.to_str().unwrap()]);
    assert_code(&bad, 9);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is a file, not a folder"), "{bad:?}");
}
