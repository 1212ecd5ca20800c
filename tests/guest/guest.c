/*
 * snaptree test guest: a bare-metal multiboot (v1) ELF for `qemu -kernel`.
 *
 * No OS, no interrupts, no devices: the CPU enters _start in 32-bit flat
 * protected mode (multiboot contract) and loops forever:
 *
 *   for n = 0, 1, 2, ...:
 *       fill page (n mod DIRTY_PAGES) of the dirty region with the value n
 *       *COUNTER = n + 1                      (heartbeat)
 *
 * Fixed physical addresses (tests read them with HMP `xp` / QMP `pmemsave`):
 *   COUNTER_ADDR  0x00200000  u32 heartbeat = number of pages completely filled
 *   MAGIC_ADDR    0x00200004  u32 0x534e4150 ("SNAP") once the guest runs
 *   DIRTY_ADDR    0x00400000  DIRTY_SIZE (4 MiB) of pages being rewritten
 *
 * Consistency property of any point-in-time memory image with counter C > 0:
 * every word of the dirty region is < C + 1 (the page being filled holds C
 * or older values), and page (C-1) mod DIRTY_PAGES is entirely C-1.  A memory
 * save that is not a single instant (pages saved after the guest moved on)
 * breaks this.  The guest needs >= 8 MiB of RAM.
 */
#define COUNTER_ADDR 0x00200000u
#define MAGIC_ADDR   0x00200004u
#define DIRTY_ADDR   0x00400000u
#define DIRTY_SIZE   (4u << 20)
#define PAGE_WORDS   1024u                       /* 4 KiB pages */
#define DIRTY_PAGES  (DIRTY_SIZE / (PAGE_WORDS * 4u))

/* Multiboot v1 header: magic, flags (0: plain ELF loading), checksum.
 * guest.ld puts .multiboot first so it sits in the first 8 KiB of the file. */
__attribute__((section(".multiboot"), used, aligned(4)))
static const unsigned int multiboot_header[3] = {
    0x1BADB002u, 0u, -(0x1BADB002u)
};

unsigned char stack[4096] __attribute__((aligned(16)));  /* used by _start */

void guest_main(void) __attribute__((noreturn, used));

/* Entry point: set up a stack, then run guest_main (never returns). */
__asm__(
    ".section .text\n"
    ".global _start\n"
    "_start:\n"
    "    cli\n"
    "    movl $stack + 4096, %esp\n"
    "    call guest_main\n"
    "1:  hlt\n"
    "    jmp 1b\n");

void guest_main(void)
{
    volatile unsigned int *counter = (volatile unsigned int *)COUNTER_ADDR;
    volatile unsigned int *dirty = (volatile unsigned int *)DIRTY_ADDR;
    unsigned int n = 0;

    *counter = 0;
    *(volatile unsigned int *)MAGIC_ADDR = 0x534e4150u;      /* "SNAP" */
    for (;;) {
        /* volatile stores: gcc may not turn this into a memset call */
        volatile unsigned int *page = dirty + (n % DIRTY_PAGES) * PAGE_WORDS;
        for (unsigned int i = 0; i < PAGE_WORDS; i++)
            page[i] = n;
        n++;
        *counter = n;
    }
}
