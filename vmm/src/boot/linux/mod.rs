//! Linux boot: bzImage/ELF via linux-loader, boot params, e820, mptable, CPL0 entry.
