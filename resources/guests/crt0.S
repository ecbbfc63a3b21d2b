/*
 * Entry point of Mosaic guest programs (docs/GUEST-ABI.md).
 *
 * Entered on every vCPU at CPL3 with
 *   RDI = vCPU index, RSI = vCPU count, RDX = boot-info address, RSP = stack top.
 * Calls  int guest_main(uint32_t vcpu, uint32_t nvcpus, const struct boot_info *bi);
 * then vCPU 0 writes the return value to the exit port (0x500), every other vCPU
 * writes it to the park port (0x502). It never falls through.
 */
    .section .text.start, "ax", @progbits
    .globl _start
    .type _start, @function
_start:
    xor     %ebp, %ebp              /* end of the frame-pointer chain */
    mov     %edi, %ebx              /* vCPU index, callee-saved across guest_main */
    and     $-16, %rsp              /* SysV: RSP % 16 == 0 at the call */
    call    guest_main              /* args are still in EDI, ESI, RDX */

    mov     $0x500, %edx            /* exit port */
    test    %ebx, %ebx
    jz      1f
    mov     $0x502, %edx            /* park port */
1:  outl    %eax, %dx
2:  pause                           /* the VMM stops this vCPU; never fall through */
    jmp     2b
    .size _start, . - _start

    .section .note.GNU-stack, "", @progbits
