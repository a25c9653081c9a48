//! The bus that routes a vCPU's port I/O and MMIO exits to devices.
