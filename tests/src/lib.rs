//! Integration tests that run real KVM guests.
