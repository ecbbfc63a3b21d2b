/*
 * Host-check probe (`mosaic host-check`), docs/GUEST-ABI.md.
 *
 * May be entered at CPL3 (runs natively) or at CPL0 (where these hosts run it through
 * KVM's instruction emulator), so it uses only mov, add, xor, dec, jnz and out, and
 * no stack. Writes the boot-marker port (0x501), runs 200000 iterations of a small
 * ALU loop, writes 0 to the exit port (0x500), then spins.
 */
    .section .text.start, "ax", @progbits
    .globl _start
    .type _start, @function
_start:
    mov     $0x501, %edx            /* boot marker */
    xor     %eax, %eax
    out     %al, %dx

    mov     $200000, %ecx           /* iterations */
    mov     $0x9e3779b9, %esi
1:  add     %ecx, %eax
    xor     %esi, %eax
    add     %eax, %esi
    dec     %ecx
    jnz     1b

    mov     $0x500, %edx            /* exit with code 0 */
    xor     %eax, %eax
    out     %al, %dx

2:  mov     $2, %ecx                /* spin: dec 2 -> 1 leaves ZF clear, jnz taken */
    dec     %ecx
    jnz     2b
    .size _start, . - _start

    .globl probe_iterations
    .set probe_iterations, 200000

    .section .note.GNU-stack, "", @progbits
