//! Reading the VMM's boot report (`--boot-report FILE`): JSON with
//! timestamps in microseconds since process start, and the exit reason.

use serde_json::{Map, Value};

/// The timestamp fields, in the order the phases happen.
pub const PHASES: [&str; 7] = [
    "args_parsed",
    "kernel_loaded",
    "vm_created",
    "first_kvm_run",
    "first_serial_byte",
    "init_reached",
    "exit",
];

/// The exit reason field.
pub const EXIT_REASON: &str = "exit_reason";

/// The phases up to the first `KVM_RUN`, in the order they end: those present must be
/// non-decreasing (`plan_verified` and `artifacts_measured` are null under `--dev`).
pub const SEQUENCE: [&str; 7] = [
    "args_parsed",
    "plan_verified",
    "artifacts_measured",
    "kernel_loaded",
    "vm_created",
    "vcpus_ready",
    "first_kvm_run",
];

/// Pairs `(earlier, later)` that must hold after [`SEQUENCE`]. The first serial
/// byte and the init signal may come in either order (a `quiet` kernel may print
/// nothing before init), so each is only bounded by the first `KVM_RUN` and the exit.
const ORDER: [(&str, &str); 5] = [
    ("first_kvm_run", "first_serial_byte"),
    ("first_kvm_run", "init_reached"),
    ("first_serial_byte", "exit"),
    ("init_reached", "exit"),
    ("first_kvm_run", "exit"),
];

/// A parsed boot report.
#[derive(Debug, Clone)]
pub struct BootReport {
    fields: Map<String, Value>,
}

impl BootReport {
    /// Parses the report text; it must be a JSON object.
    pub fn parse(text: &str) -> Result<Self, String> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(fields)) => Ok(Self { fields }),
            Ok(other) => Err(format!("boot report is not a JSON object: {other}")),
            Err(e) => Err(format!("boot report is not JSON: {e}")),
        }
    }

    /// Timestamp `name` in microseconds, when present and a whole number.
    pub fn micros(&self, name: &str) -> Option<u64> {
        self.fields.get(name).and_then(Value::as_u64)
    }

    /// The exit reason, when present.
    pub fn exit_reason(&self) -> Option<&str> {
        self.fields.get(EXIT_REASON).and_then(Value::as_str)
    }

    /// Every phase is present, the exit reason is non-empty, and the
    /// timestamps are in phase order. Returns what is wrong, all of it.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for phase in PHASES {
            if self.micros(phase).is_none() {
                problems.push(format!(
                    "{phase} missing or not an integer (got {})",
                    self.fields
                        .get(phase)
                        .map_or("nothing".into(), Value::to_string)
                ));
            }
        }
        if self.exit_reason().is_none_or(str::is_empty) {
            problems.push(format!("{EXIT_REASON} missing or empty"));
        }
        let present: Vec<(&str, u64)> = SEQUENCE
            .iter()
            .filter_map(|p| self.micros(p).map(|t| (*p, t)))
            .collect();
        for pair in present.windows(2) {
            if let [(earlier, a), (later, b)] = pair {
                if a > b {
                    problems.push(format!("{earlier} ({a} us) after {later} ({b} us)"));
                }
            }
        }
        for (earlier, later) in ORDER {
            if let (Some(a), Some(b)) = (self.micros(earlier), self.micros(later)) {
                if a > b {
                    problems.push(format!("{earlier} ({a} us) after {later} ({b} us)"));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Field `name` as it is (objects such as `jail`).
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }

    /// The report as one JSON line, for logs.
    pub fn to_line(&self) -> String {
        Value::Object(self.fields.clone()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"args_parsed":10,"kernel_loaded":900,"vm_created":1000,
        "first_kvm_run":1200,"first_serial_byte":90000,"init_reached":80000,
        "exit":120000,"exit_reason":"guest poweroff"}"#;

    #[test]
    fn good_report_validates() {
        let r = BootReport::parse(GOOD).unwrap();
        r.validate().unwrap();
        assert_eq!(r.micros("exit"), Some(120_000));
        assert_eq!(r.exit_reason(), Some("guest poweroff"));
    }

    #[test]
    fn missing_field_is_named() {
        let r = BootReport::parse(&GOOD.replace("\"init_reached\":80000,", "")).unwrap();
        let e = r.validate().unwrap_err();
        assert!(e.contains("init_reached missing"), "{e}");
    }

    #[test]
    fn out_of_order_is_named() {
        let r =
            BootReport::parse(&GOOD.replace("\"vm_created\":1000", "\"vm_created\":5000")).unwrap();
        let e = r.validate().unwrap_err();
        assert!(
            e.contains("vm_created (5000 us) after first_kvm_run"),
            "{e}"
        );
    }

    /// `args_parsed` used to be stamped after the jail, so a signed boot's came after
    /// `plan_verified` and `artifacts_measured`.
    #[test]
    fn a_signed_boots_phases_are_ordered_too() {
        let signed = GOOD.replace(
            "\"args_parsed\":10,",
            "\"args_parsed\":10,\"plan_verified\":300,\"artifacts_measured\":700,",
        );
        BootReport::parse(&signed).unwrap().validate().unwrap();
        let late = signed.replace("\"args_parsed\":10,", "\"args_parsed\":800,");
        let e = BootReport::parse(&late).unwrap().validate().unwrap_err();
        assert!(
            e.contains("args_parsed (800 us) after plan_verified (300 us)"),
            "{e}"
        );
        let swapped = signed.replace("\"plan_verified\":300", "\"plan_verified\":750");
        let e = BootReport::parse(&swapped).unwrap().validate().unwrap_err();
        assert!(
            e.contains("plan_verified (750 us) after artifacts_measured (700 us)"),
            "{e}"
        );
        // Under --dev the plan's phases are null, and skipped.
        let dev = GOOD.replace(
            "\"args_parsed\":10,",
            "\"args_parsed\":10,\"plan_verified\":null,\"artifacts_measured\":null,",
        );
        BootReport::parse(&dev).unwrap().validate().unwrap();
    }

    #[test]
    fn empty_reason_and_null_timestamp_fail() {
        let r = BootReport::parse(
            &GOOD
                .replace("\"guest poweroff\"", "\"\"")
                .replace("\"exit\":120000", "\"exit\":null"),
        )
        .unwrap();
        let e = r.validate().unwrap_err();
        assert!(e.contains("exit_reason"), "{e}");
        assert!(e.contains("exit missing"), "{e}");
    }

    #[test]
    fn non_object_is_refused() {
        assert!(BootReport::parse("[1,2]").is_err());
        assert!(BootReport::parse("{").is_err());
    }
}
