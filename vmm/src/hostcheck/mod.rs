//! `mosaic host-check`: what this host can do for Mosaic.
