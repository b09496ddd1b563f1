//! The binary's own surface: help texts and local-only subcommands. (Having an integration test
//! here also makes `cargo test` rebuild the `kindling` binary the end-to-end suite runs.)

use std::process::Command;

fn kindling() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kindling"))
}

#[test]
fn help_lists_every_subcommand() {
    let out = kindling().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for cmd in ["serve", "deploy", "list", "delete", "invoke", "models"] {
        assert!(help.contains(cmd), "--help lacks {cmd}:\n{help}");
    }
}

#[test]
fn make_tiny_writes_a_loadable_model_and_rejects_a_bad_arch() {
    let dir = tempfile::tempdir().unwrap();
    let out = kindling().args(["models", "make-tiny", "--arch", "llama"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let out = kindling().args(["models", "make-tiny", "--arch", "gpt5"]).arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn client_commands_explain_an_unreachable_server() {
    let out = kindling().args(["list", "--url", "http://127.0.0.1:9"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not reach the kindling server"), "{err}");
}
