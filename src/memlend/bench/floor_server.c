/* The floor under a lender's CPU per GET (memlend.bench.lender_cpu): the least a
   server on epoll can do per request. One connection, no handshake, no lookup: for
   every whole frame received (memlend's 14-byte header, its length at byte 10) it
   sends one prebuilt GET_REPLY of a 16 KiB value. epoll_wait blocks (no spin), as
   a lender that uses no CPU when idle must.

   usage: floor_server PORT */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define HDR 14
#define VALUE 16384

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1)) return perror("bind"), 1;
    /* The reply: header (version 1, type GET_REPLY 0x11, request id 0, length) and a
       payload of one found value (u16 count, u8 found, u32 length, the bytes). */
    static unsigned char reply[HDR + 7 + VALUE], in[1 << 16];
    uint32_t plen = 7 + VALUE;
    reply[0] = 'M'; reply[1] = 'L'; reply[2] = 1; reply[3] = 0x11;
    reply[10] = plen >> 24; reply[11] = plen >> 16; reply[12] = plen >> 8; reply[13] = plen;
    reply[HDR + 1] = 1; reply[HDR + 2] = 1;
    reply[HDR + 3] = VALUE >> 24; reply[HDR + 4] = VALUE >> 16; reply[HDR + 5] = VALUE >> 8;
    for (;;) { /* one connection at a time (the benchmark's port probe comes first) */
      int fd = accept(ls, NULL, NULL);
      if (fd < 0) return perror("accept"), 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      int ep = epoll_create1(0);
      struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
      epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
      size_t have = 0;
      for (;;) {
        if (epoll_wait(ep, &ev, 1, -1) < 1) continue;
        ssize_t r = recv(fd, in + have, sizeof in - have, MSG_DONTWAIT);
        if (r == 0) break;
        if (r < 0) continue;
        have += (size_t)r;
        size_t pos = 0;
        while (have - pos >= HDR) {
            size_t len = (size_t)in[pos + 10] << 24 | in[pos + 11] << 16 | in[pos + 12] << 8 | in[pos + 13];
            if (have - pos < HDR + len) break;
            memcpy(reply + 6, in + pos + 6, 4); /* the request id */
            if (send(fd, reply, sizeof reply, MSG_NOSIGNAL) < 0) break;
            pos += HDR + len;
        }
        memmove(in, in + pos, have - pos);
        have -= pos;
      }
      close(ep);
      close(fd);
    }
}
