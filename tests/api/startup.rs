//! Start-up: a bad value stops the real binary with a message naming the variable.

use std::process::Command;

fn start_with(var: &str, value: &str) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_chat-sync"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("BIND_ADDR", "127.0.0.1")
        .env("REDIS_IP", "127.0.0.1")
        .env(var, value)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run chat-sync");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_values_stop_start_up_naming_the_variable() {
    for (var, value) in [
        ("TICK_MS", "soon"),
        ("TICK_MS", "0"),
        ("PORT", "99999"),
        ("PORT", "http"),
        ("REDIS_PORT", "six"),
        ("REDIS_PORT", "0"),
    ] {
        let (code, stderr) = start_with(var, value);
        assert_eq!(
            code,
            Some(2),
            "{var}={value} should stop start-up: {stderr}"
        );
        assert!(
            stderr.contains("configuration error") && stderr.contains(var),
            "{var}={value}: {stderr}"
        );
    }
}
