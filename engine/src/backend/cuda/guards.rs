//! The host-side checks every op makes before a launch: a view shorter than what the kernel
//! will touch is a shape error naming the op and the argument, never an out-of-bounds access.

use crate::error::{Error, Result};

pub(super) fn check(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Shape(what()))
    }
}

pub(super) fn len_is(op: &str, name: &str, got: usize, want: usize) -> Result<()> {
    check(got == want, || {
        format!("{op}: `{name}` has {got} elements, expected {want}")
    })
}

pub(super) fn len_at_least(op: &str, name: &str, got: usize, want: usize) -> Result<()> {
    check(got >= want, || {
        format!("{op}: `{name}` has {got} elements, needs at least {want}")
    })
}
