//! `mvm secret set|ls|rm`: the host's secret store ([`crate::secrets::store`]).
//!
//! A value is read from stdin, never from the command line; nothing this command prints
//! holds a value, only names, sizes and sha256 digests. Exit statuses: 0 done; 1 the store
//! refused (a bad name or value, an unsafe file, a name not there); 2 the store or stdin
//! could not be used.

use std::io::{IsTerminal, Read};

use clap::Subcommand;
use serde_json::json;

use crate::secrets::store::{value_from_input, SecretStore, StoreError};
use crate::secrets::MAX_VALUE_BYTES;

/// `mvm secret ...`.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store a secret, its value read from stdin (`printf %s "$TOKEN" | mvm secret set
    /// NAME`); one trailing newline is dropped unless --raw.
    Set {
        /// Its name: 1 to 64 of A-Z a-z 0-9 _ . -
        name: String,
        /// Keep the value's bytes exactly as read (a trailing newline too).
        #[arg(long)]
        raw: bool,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List the stored secrets: names, sizes and sha256 digests, never values.
    Ls {
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret.
    Rm {
        /// Its name.
        name: String,
    },
}

fn code(e: &StoreError) -> i32 {
    match e {
        StoreError::NoConfigDir | StoreError::Io { .. } => 2,
        _ => 1,
    }
}

fn fail(e: &StoreError) -> i32 {
    eprintln!("mvm: error: {e}");
    code(e)
}

/// Runs `command`; returns the exit status.
pub fn main(command: &SecretCommand) -> i32 {
    let store = match SecretStore::open() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    match command {
        SecretCommand::Set { name, raw, json } => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("mvm: reading the value of {name} from the terminal; end it with Ctrl-D");
            }
            let mut bytes = Vec::new();
            let limit = u64::try_from(MAX_VALUE_BYTES).unwrap_or(u64::MAX);
            if let Err(e) = stdin
                .lock()
                .take(limit.saturating_add(2))
                .read_to_end(&mut bytes)
            {
                zeroize::Zeroize::zeroize(&mut bytes);
                eprintln!("mvm: error: reading the value from stdin: {e}");
                return 2;
            }
            let value = value_from_input(bytes, *raw);
            if let Err(e) = store.set(name, &value) {
                return fail(&e);
            }
            if *json {
                println!(
                    "{}",
                    json!({"name": name, "bytes": value.len(), "sha256": value.digest()})
                );
            } else {
                println!("stored {name} ({} bytes, {})", value.len(), value.digest());
            }
            0
        }
        SecretCommand::Ls { json } => {
            let listed = match store.list() {
                Ok(l) => l,
                Err(e) => return fail(&e),
            };
            if *json {
                println!("{}", serde_json::to_string(&listed).unwrap_or_default());
            } else if listed.is_empty() {
                println!("no secrets in {}", store.dir().display());
            } else {
                for s in listed {
                    println!("{:<24} {:>6} bytes  {}", s.name, s.bytes, s.sha256);
                }
            }
            0
        }
        SecretCommand::Rm { name } => match store.remove(name) {
            Ok(()) => {
                println!("removed {name}");
                0
            }
            Err(e) => fail(&e),
        },
    }
}
