//! Constructors for the events the issue lists, so every writer uses the same
//! field names and none can slip a payload in: argv, file contents and output
//! go in as digests and sizes only.

use mvm_loader::measure::Sha256Digest;
use mvm_loader::plan::envelope::SignedPlan;
use mvm_loader::plan::Plan;

use super::record::{AuditEvent, EventKind};
use crate::admission::Denial;
use crate::backend::SessionEvent;
use crate::receipt::command_digest;
use crate::secrets::ReleasedSecret;

impl AuditEvent {
    /// Admission signed `signed`.
    pub fn plan_admitted(signed: &SignedPlan) -> Self {
        let plan = &signed.plan;
        let event = Self::new(EventKind::PlanAdmitted)
            .plan(&plan.plan_id)
            .field("plan_sha256", signed.digest)
            .field("kernel", plan.artifacts.kernel)
            .field("vcpus", u64::from(plan.resources.vcpus))
            .field("memory_mib", plan.resources.memory_mib)
            .field("required_tier", plan.required_tier.to_string())
            .field(
                "egress_rules",
                plan.devices
                    .net
                    .as_ref()
                    .map_or(0, |n| n.egress.allow.len() as u64),
            )
            .field("secrets", plan.secrets.join(","))
            .field(
                "forwards",
                plan.devices
                    .vsock
                    .as_ref()
                    .map(|v| {
                        v.forwards
                            .iter()
                            .map(|f| format!("{}:{}", f.host, f.guest))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default(),
            );
        match &plan.substitution {
            // The names of the secrets the guest sees only as placeholders.
            Some(substitution) => event.field(
                "substituted",
                substitution
                    .secrets
                    .iter()
                    .map(|x| x.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            None => event,
        }
    }

    /// Admission refused a request for `image_ref`.
    pub fn plan_denied(image_ref: &str, denial: &Denial) -> Self {
        Self::new(EventKind::PlanDenied)
            .field("image", truncate(image_ref))
            .field("rule", denial.rule.to_string())
            .field("reason", truncate(&denial.reason))
    }

    /// The VMM verified `plan` and measured every artifact.
    pub fn boot_verified(plan: &Plan, vm_id: &str) -> Self {
        let a = &plan.artifacts;
        let mut event = Self::new(EventKind::BootVerified)
            .plan(&plan.plan_id)
            .vm(vm_id)
            .field("kernel", a.kernel)
            .field("cmdline", a.cmdline);
        if let Some(initramfs) = a.initramfs {
            event = event.field("initramfs", initramfs);
        }
        for disk in &a.disks {
            event = event.field(
                &format!("disk_{}_root_hash", disk.name),
                disk.verity.root_hash.to_string(),
            );
        }
        event
    }

    /// The VMM refused to boot; `reason` is the stable short name
    /// (`PlanVerifyError::reason`, or e.g. `kernel_mismatch`), `detail` the
    /// message naming the artifact and both digests.
    pub fn boot_refused(plan_id: Option<&str>, vm_id: &str, reason: &str, detail: &str) -> Self {
        let mut event = Self::new(EventKind::BootRefused)
            .vm(vm_id)
            .field("reason", truncate(reason))
            .field("detail", truncate(detail));
        if let Some(id) = plan_id {
            event = event.plan(id);
        }
        event
    }

    /// A verified disk's block failed its hash tree.
    pub fn verity_failure(
        plan_id: &str,
        vm_id: &str,
        disk: &str,
        block: u64,
        detail: &str,
    ) -> Self {
        Self::new(EventKind::VerityFailure)
            .plan(plan_id)
            .vm(vm_id)
            .field("disk", truncate(disk))
            .field("block", block)
            .field("detail", truncate(detail))
    }

    /// A command started in the guest.
    pub fn exec_started<S: AsRef<[u8]>>(plan_id: &str, vm_id: &str, argv: &[S]) -> Self {
        Self::new(EventKind::ExecStarted)
            .plan(plan_id)
            .vm(vm_id)
            .field("argv_sha256", command_digest(argv))
            .field("argc", argv.len() as u64)
    }

    /// A secret was handed to the backend for the measured guest of `plan_id` (its name,
    /// the sha256 of its value and how it goes in; never the value).
    pub fn secret_released(plan_id: &str, vm_id: &str, secret: &ReleasedSecret) -> Self {
        Self::new(EventKind::SecretReleased)
            .plan(plan_id)
            .vm(vm_id)
            .field("name", secret.name.clone())
            .field("value_sha256", secret.sha256)
            .field("delivery", secret.delivery.clone())
    }

    /// The egress proxy substituted `name` (whose value has digest `value_sha256`) in a
    /// request to `destination`.
    pub fn secret_substituted(
        plan_id: &str,
        vm_id: &str,
        name: &str,
        value_sha256: &Sha256Digest,
        destination: &str,
    ) -> Self {
        Self::new(EventKind::SecretSubstituted)
            .plan(plan_id)
            .vm(vm_id)
            .field("name", name.to_owned())
            .field("value_sha256", *value_sha256)
            .field("destination", truncate(destination))
    }

    /// The egress proxy refused a request to `destination` (or the response to it) for
    /// `reason`; `name`: the secret concerned, when one is.
    pub fn secret_refused(
        plan_id: &str,
        vm_id: &str,
        name: Option<&str>,
        destination: &str,
        reason: &str,
    ) -> Self {
        let event = Self::new(EventKind::SecretRefused)
            .plan(plan_id)
            .vm(vm_id)
            .field("destination", truncate(destination))
            .field("reason", truncate(reason));
        match name {
            Some(name) => event.field("name", name.to_owned()),
            None => event,
        }
    }

    /// A command exited.
    pub fn exec_exited(
        plan_id: &str,
        vm_id: &str,
        exit_status: i32,
        stdout: (Sha256Digest, u64),
        stderr: (Sha256Digest, u64),
    ) -> Self {
        Self::new(EventKind::ExecExited)
            .plan(plan_id)
            .vm(vm_id)
            .field("exit_status", exit_status)
            .field("stdout_sha256", stdout.0)
            .field("stdout_bytes", stdout.1)
            .field("stderr_sha256", stderr.0)
            .field("stderr_bytes", stderr.1)
    }

    /// A file was written into the guest: its path, size and digest.
    pub fn file_written(plan_id: &str, vm_id: &str, path: &str, contents: &[u8]) -> Self {
        Self::new(EventKind::FileWritten)
            .plan(plan_id)
            .vm(vm_id)
            .field("path", truncate(path))
            .field("size", contents.len() as u64)
            .field("sha256", Sha256Digest::of(contents))
    }

    /// What a sandbox's session did in the guest: each request by the session's
    /// number for it, argv and files by digest and size.
    pub fn session(plan_id: &str, vm_id: &str, event: &SessionEvent) -> Self {
        let base = |kind| Self::new(kind).plan(plan_id).vm(vm_id);
        match event {
            SessionEvent::ExecStarted { request, argv } => {
                Self::exec_started(plan_id, vm_id, argv).field("request", *request)
            }
            SessionEvent::ExecExited {
                request,
                status,
                stdout,
                stderr,
                error,
            } => {
                let mut e = base(EventKind::ExecExited)
                    .field("request", *request)
                    .field("stdout_sha256", stdout.0)
                    .field("stdout_bytes", stdout.1)
                    .field("stderr_sha256", stderr.0)
                    .field("stderr_bytes", stderr.1);
                if let Some(status) = status {
                    e = e.field("exit_status", *status);
                }
                if let Some(error) = error {
                    e = e.field("error", truncate(error));
                }
                e
            }
            SessionEvent::FileWritten {
                request,
                path,
                data,
                complete,
            } => base(EventKind::FileWritten)
                .field("request", *request)
                .field("path", truncate(path))
                .field("size", data.1)
                .field("sha256", data.0)
                .field("complete", *complete),
            SessionEvent::FileRead {
                request,
                path,
                data,
                complete,
            } => base(EventKind::FileRead)
                .field("request", *request)
                .field("path", truncate(path))
                .field("size", data.1)
                .field("sha256", data.0)
                .field("complete", *complete),
            SessionEvent::ForwardOpened { request, port } => base(EventKind::ForwardOpened)
                .field("request", *request)
                .field("port", u64::from(*port)),
            SessionEvent::ForwardClosed {
                request,
                port,
                to_guest,
                from_guest,
                error,
            } => {
                let mut e = base(EventKind::ForwardClosed)
                    .field("request", *request)
                    .field("port", u64::from(*port))
                    .field("to_guest_bytes", *to_guest)
                    .field("from_guest_bytes", *from_guest);
                if let Some(error) = error {
                    e = e.field("error", truncate(error));
                }
                e
            }
            SessionEvent::Stopping { reason } => {
                base(EventKind::SessionStopping).field("reason", truncate(reason))
            }
        }
    }

    /// The VM exited; `reason` as the VMM reported it (poweroff, reset, panic,
    /// timeout, ...).
    pub fn vm_exited(plan_id: &str, vm_id: &str, reason: &str, status: i32) -> Self {
        Self::new(EventKind::VmExited)
            .plan(plan_id)
            .vm(vm_id)
            .field("reason", truncate(reason))
            .field("status", status)
    }
}

/// Keeps text under the field limit (on a character boundary), marking a cut.
fn truncate(text: &str) -> String {
    const KEEP: usize = super::record::MAX_TEXT_BYTES - 16;
    if text.len() <= KEEP {
        return text.to_owned();
    }
    let mut end = KEEP;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...[cut]", text.get(..end).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Rule;
    use crate::audit::FieldValue;

    #[test]
    fn events_carry_digests_not_payloads() {
        let secret_file = vec![b'x'; 100_000];
        let e = AuditEvent::file_written("p", "vm", "/etc/token", &secret_file);
        assert!(e.validate().is_ok());
        assert_eq!(e.fields["size"], FieldValue::UInt(100_000));
        assert_eq!(
            e.fields["sha256"],
            FieldValue::from(Sha256Digest::of(&secret_file))
        );
        let e = AuditEvent::exec_started("p", "vm", &["sh", "-c", "echo hunter2"]);
        assert!(!format!("{e:?}").contains("hunter2"));
        assert_eq!(e.fields["argc"], FieldValue::UInt(3));
    }

    #[test]
    fn long_reasons_are_cut_to_fit() {
        let denial = Denial {
            rule: Rule::Egress,
            reason: "é".repeat(2000),
        };
        let e = AuditEvent::plan_denied("img", &denial);
        assert!(e.validate().is_ok());
        assert_eq!(e.fields["rule"], FieldValue::from("egress.allow"));
        let e = AuditEvent::exec_exited(
            "p",
            "v",
            -1,
            (Sha256Digest::of(b""), 0),
            (Sha256Digest::of(b""), 0),
        );
        assert_eq!(e.fields["exit_status"], FieldValue::Int(-1));
    }
}
