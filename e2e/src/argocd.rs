//! Argo CD's health checks for the Flowlens kinds
//! (`deploy/argocd/resource_customizations/flowlens.dev/<Kind>/health.lua`),
//! run as Argo CD runs them: the object as the global `obj`, the script's
//! returned table as the health. Argo CD embeds gopher-lua, a Lua 5.1; the
//! tests use Debian's `lua5.1`.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cluster::repo_root;

/// An Argo CD health: `Healthy`, `Progressing`, `Degraded`, ... and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub status: String,
    pub message: String,
}

/// The folder of a kind's health check, in Argo CD's own layout.
pub fn check_dir(kind: &str) -> PathBuf {
    repo_root()
        .join("deploy/argocd/resource_customizations/flowlens.dev")
        .join(kind)
}

/// The health Argo CD shows for `obj` (an object as the API server serves
/// it, with `kind`).
pub fn health(obj: &Value) -> anyhow::Result<Health> {
    let kind = obj["kind"].as_str().context("the object has no kind")?;
    let script = check_dir(kind).join("health.lua");
    let mut program = String::from("obj = ");
    lua_literal(obj, &mut program);
    write!(
        program,
        "\nlocal hs = dofile({})\nio.write(hs.status, \"\\n\", hs.message)\n",
        lua_string(&script.to_string_lossy())
    )
    .unwrap();
    let mut lua = Command::new("lua5.1")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running lua5.1 (just setup installs it)")?;
    lua.stdin
        .take()
        .context("lua5.1's stdin")?
        .write_all(program.as_bytes())?;
    let out = lua.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = String::from_utf8(out.stdout)?;
    let (status, message) = out.split_once('\n').unwrap_or((&out, ""));
    Ok(Health {
        status: status.to_owned(),
        message: message.to_owned(),
    })
}

/// JSON as a Lua table constructor; `null` members are left out (Argo CD
/// hands Lua no nil members either).
fn lua_literal(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("nil"),
        Value::Bool(b) => write!(out, "{b}").unwrap(),
        Value::Number(n) => write!(out, "{n}").unwrap(),
        Value::String(s) => out.push_str(&lua_string(s)),
        Value::Array(items) => {
            out.push('{');
            for item in items {
                lua_literal(item, out);
                out.push(',');
            }
            out.push('}');
        }
        Value::Object(members) => {
            out.push('{');
            for (k, item) in members.iter().filter(|(_, v)| !v.is_null()) {
                write!(out, "[{}]=", lua_string(k)).unwrap();
                lua_literal(item, out);
                out.push(',');
            }
            out.push('}');
        }
    }
}

/// A Lua string literal: every byte but letters, digits and spaces as a
/// decimal escape, so no input can end the literal.
fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b' ' {
            out.push(b as char);
        } else {
            write!(out, "\\{b:03}").unwrap();
        }
    }
    out.push('"');
    out
}
