//! The mvm runtime SDK: admission, images, backends, audit, receipts.
