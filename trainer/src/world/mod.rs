//! The built-in assistant world (issue 5): see the module docs.
