//! Built-in guest programs, compiled from resources/guests by build.rs.
