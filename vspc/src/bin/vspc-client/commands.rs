//! The one-shot commands: `list` (the VM listing, as `name:uuid:port` lines
//! or one line of JSON) and `clear` (disconnect a VM's consoles). Each asks
//! the admin port once and prints the answer.

use serde_json::Value;
use vspc_codec::words::shell_quote;

use crate::admin::{is_ok, refused, Server};
use crate::output::{failure, write_stdout, Failure, EXIT_ERROR};

/// Print the server's VMs; sorted `name:uuid[:port]` lines, or with `json`
/// the server's list as one line of JSON.
pub(crate) async fn list(server: &Server, json: bool) -> Result<u8, Failure> {
    let (_, answer, _) = server.ask("list").await?;
    if !is_ok(&answer) {
        return Err(refused(server, "", None, &answer));
    }
    let Some(vms) = answer.get("vms").and_then(Value::as_array) else {
        return Err(failure(EXIT_ERROR, "the server's listing has no 'vms'"));
    };
    let mut text = String::new();
    if json {
        text = Value::Array(vms.clone()).to_string();
        text.push('\n');
    } else {
        let field = |vm: &Value, key: &str| -> String {
            match vm.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            }
        };
        let mut rows: Vec<(String, String, Option<String>)> = vms
            .iter()
            .map(|vm| {
                let port = match vm.get("port") {
                    None | Some(Value::Null) => None,
                    Some(_) => Some(field(vm, "port")),
                };
                (field(vm, "name"), field(vm, "uuid"), port)
            })
            .collect();
        rows.sort();
        for (name, uuid, port) in rows {
            match port {
                Some(p) => text.push_str(&format!("{name}:{uuid}:{p}\n")),
                None => text.push_str(&format!("{name}:{uuid}\n")),
            }
        }
    }
    write_stdout(text.as_bytes())?;
    Ok(0)
}

/// Disconnect every console of `vm` and say how many there were.
pub(crate) async fn clear(server: &Server, vm: &str) -> Result<u8, Failure> {
    let (_, answer, _) = server.ask(&format!("clear {}", shell_quote(vm))).await?;
    if !is_ok(&answer) {
        return Err(refused(server, vm, None, &answer));
    }
    let n = answer.get("cleared").and_then(Value::as_u64).unwrap_or(0);
    write_stdout(format!("cleared {n} console(s) of {vm}\n").as_bytes())?;
    Ok(0)
}
